"""Where a saved model folder finds its base VLM and prior encoder, so that a folder copied elsewhere still loads.

A folder saved by this version (manifest format 2) records each base by name and content hash, never by an absolute
path:

    "vlm": {"name": "vlm_base-3f2a...", "sha256": "<64 hex>", "relative_hint": "../../cache/vlm_base-3f2a..."}

`name` is the base folder's name (a Hugging Face cache snapshot, `models--ORG--NAME/snapshots/REV`, is named by its
hub id `ORG/NAME`); `relative_hint` is where the base was relative to the model folder when it was saved (a hint,
never required). Loading looks, in order, at: the folder given explicitly (`--vlm DIR` / `--encoder DIR`, or
`BaseFolders`), `$MEDSYNAPSE_CACHE/NAME` (default cache ~/.cache/medsynapse), `NAME` next to the model folder, then
the hint. A candidate is used only when its content hash is the recorded one: a given folder with other content is
refused naming both hashes; a same-named folder with other content in the search path is passed over (and named if
nothing matches). Nothing found is one error naming the base, its hash, every place looked and how to point to it.

The content hash (`content_sha256`) is SHA-256 over every file of the folder except hidden ones (`.cache/` of
`hf download --local-dir`, the demo's `.done`) and `__pycache__`: each file's relative path and size, then its bytes
when it is at most 4 MiB (configs, tokenizers, templates, a tiny model's weights) or else five 1 MiB windows (start,
quarters, end). Why this: it depends on content only (a copy, a new path, owner or mtime keep it), it tells apart two
checkpoints of one architecture (their weights differ in every window, and a safetensors header, in the first window,
names every tensor's dtype, shape and offset) and any config or tokenizer edit, and it reads at most ~5 MiB per
weight file, so checking an 8B VLM costs milliseconds where hashing its 16 GB would cost a minute at every load. It
is an identity check, not an integrity check: a flipped byte between the windows is not seen (a truncated file is,
by its size).

Folders of manifest format 1 name each base by absolute path only: they load from that path as before (or from the
folder given explicitly, which cannot be checked: they carry no hash).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medsynapse.model.processor import ModelNotFoundError

WHOLE_FILE_LIMIT = 4 * 2**20  # files up to this size are hashed whole
WINDOW = 2**20  # larger ones by five windows of this size
ROLES = {"vlm": ("base VLM", "--vlm"), "encoder": ("prior encoder", "--encoder")}


class BaseNotFoundError(ModelNotFoundError):
    """A model folder's base VLM or encoder is in none of the places searched."""


class BaseMismatchError(ValueError):
    """A folder found for a base holds other content than the one the model was saved with."""


@dataclass(frozen=True)
class BaseFolders:
    """Base folders given explicitly (the CLI's `--vlm DIR` / `--encoder DIR`): searched first, and alone."""

    vlm: str | None = None
    encoder: str | None = None


@dataclass(frozen=True)
class BaseRef:
    """How a manifest names one base: its name, content hash and (a hint) where it was relative to the model."""

    name: str
    sha256: str
    relative_hint: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "relative_hint": self.relative_hint}

    @classmethod
    def from_dict(cls, data: dict) -> BaseRef:
        return cls(str(data["name"]), str(data["sha256"]), data.get("relative_hint"))


# --- the hash ------------------------------------------------------------------------------------------------------
def hashed_files(folder: Path) -> list[Path]:
    """Every file the hash covers, sorted by relative path: all but hidden ones and `__pycache__`."""
    files = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not path.is_file():
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _file_sample(path: Path, size: int) -> Iterator[bytes]:
    """The bytes of `path` the hash reads: all of a small file, five windows of a large one."""
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            yield handle.read()
            return
        for quarter in range(5):
            handle.seek((size - WINDOW) * quarter // 4)
            yield handle.read(WINDOW)


def content_sha256(folder: str | Path) -> str:
    """The content hash of a base folder (module docstring: what it reads and why)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in hashed_files(folder):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        for chunk in _file_sample(path, size):
            digest.update(chunk)
    return digest.hexdigest()


# --- recording -----------------------------------------------------------------------------------------------------
def base_name(folder: Path) -> str:
    """The name a base is searched by: its folder's name, or the hub id of a Hugging Face cache snapshot."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def base_ref(base: str | Path, model_folder: str | Path, role: str) -> BaseRef:
    """What a manifest records for the base at `base`, saved into `model_folder`."""
    folder = Path(base).expanduser().resolve()
    if not (folder / "config.json").is_file():
        label = ROLES[role][0]
        raise ModelNotFoundError(f"{base}: the {label} this model was built from is no longer a model folder (no "
                                 f"config.json), so the saved folder could not record it; restore it and save again")
    try:
        hint = os.path.relpath(folder, Path(model_folder).expanduser().resolve())
    except ValueError:  # another drive (Windows): no relative path
        hint = None
    return BaseRef(base_name(folder), content_sha256(folder), hint)


# --- finding -------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """MedSynapse's cache: $MEDSYNAPSE_CACHE, else ~/.cache/medsynapse."""
    return Path(os.environ.get("MEDSYNAPSE_CACHE") or Path.home() / ".cache" / "medsynapse").expanduser()


def named_under(root: Path, name: str) -> list[Path]:
    """Where a base named `name` may sit under `root`: root/NAME; for a hub id ORG/NAME also root/NAME and a Hugging
    Face cache's root/models--ORG--NAME/snapshots/*."""
    paths = [root / name]
    if "/" in name:
        paths.append(root / name.rsplit("/", 1)[-1])
        paths += sorted((root / f"models--{name.replace('/', '--')}" / "snapshots").glob("*"))
    return paths


def search_path(ref: BaseRef, model_folder: Path) -> list[tuple[str, Path]]:
    """(where, candidate) in search order after an explicit folder: the cache, beside the model folder, the hint."""
    where_cache = ("$MEDSYNAPSE_CACHE" if os.environ.get("MEDSYNAPSE_CACHE") else
                   "the default cache ($MEDSYNAPSE_CACHE unset)")
    places = [(where_cache, p) for p in named_under(cache_root(), ref.name)]
    places += [("next to the model folder", p) for p in named_under(model_folder.resolve().parent, ref.name)]
    if ref.relative_hint:
        hinted = Path(os.path.normpath(model_folder.resolve() / ref.relative_hint))
        places.append((f"the recorded relative_hint {ref.relative_hint}", hinted))
    seen: set[Path] = set()
    unique = []
    for where, path in places:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((where, path))
    return unique


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_given(ref: BaseRef, given: str, role: str, manifest: Path) -> Path:
    """An explicitly given folder: it must be a model folder with the recorded content, else one refusal."""
    label, flag = ROLES[role]
    folder = Path(given).expanduser()
    if not _is_model_folder(folder):
        raise BaseNotFoundError(f"{flag} {given}: not a model folder (no config.json); give the folder of the {label} "
                                f"'{ref.name}' (sha256 {ref.sha256}) that {manifest} was saved with")
    found = content_sha256(folder)
    if found != ref.sha256:
        raise BaseMismatchError(f"{flag} {given}: its content (sha256 {found}) is not the {label} '{ref.name}' "
                                f"(sha256 {ref.sha256}) that {manifest} was saved with; refused (give the folder "
                                "it was saved with)")
    return folder


def find_base(ref: BaseRef, model_folder: Path, role: str, given: str | None = None) -> Path:
    """The folder of a recorded base: `given` (checked), else the first match in `search_path`."""
    manifest = model_folder / "medsynapse.json"
    if given:
        return check_given(ref, given, role, manifest)
    looked, others = [], []
    for where, path in search_path(ref, model_folder):
        if not _is_model_folder(path):
            looked.append(f"{where}: {path} ({'absent' if not path.exists() else 'not a model folder'})")
            continue
        found = content_sha256(path)
        if found == ref.sha256:
            return path
        others.append(f"{path} ({where}, sha256 {found})")
        looked.append(f"{where}: {path} (other content)")
    label, flag = ROLES[role]
    if others:
        raise BaseMismatchError(f"{manifest}: the {label} '{ref.name}' (sha256 {ref.sha256}) was not found; only "
                                f"other content under that name: {'; '.join(others)}; refused. Point {flag} DIR at "
                                "the folder it was saved with")
    raise BaseNotFoundError(f"{manifest}: the {label} '{ref.name}' (sha256 {ref.sha256}) was not found; looked in "
                            f"{'; '.join(looked)}. Point to it with {flag} DIR, or put it (as '{ref.name}') under "
                            "$MEDSYNAPSE_CACHE or next to the model folder")


def resolve_base(entry: str | dict | None, model_folder: str | Path, role: str, given: str | None = None) -> str | None:
    """The folder to load for a manifest's `vlm` / `encoder` entry: a format-2 record is searched for (find_base); a
    format-1 absolute path is used as recorded unless a folder is given (unchecked: no hash was recorded)."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return str(Path(given).expanduser()) if given else entry
    try:
        ref = BaseRef.from_dict(entry)
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{Path(model_folder) / 'medsynapse.json'}: its {role!r} entry {entry!r} is neither a path "
                         "nor a {name, sha256} record; the folder is damaged") from None
    return str(find_base(ref, Path(model_folder).expanduser(), role, given))
