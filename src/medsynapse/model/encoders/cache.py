"""On-disk cache of frozen prior-encoder outputs (tokens + region masks), keyed by image content and encoder.

Layout: `<root>/<encoder fingerprint>/index-2.json` + `shard_NNNNN.safetensors` (layout 2 stores each image's
`finding` flag beside its tokens and region; the index of layout 1, `index.json`, is ignored, so an older cache is
recomputed rather than read without it). The fingerprint hashes the encoder
folder's json files (config, tokenizer, settings such as SAM 3 prompts), the whole content of its weight files and the
settings the encoder resolves from code defaults (`encoder_settings`), so a changed encoder never reads
stale features. Images are keyed by the SHA-256 of their file bytes, so renamed copies hit and edited files miss.
Hashing every byte of a multi-GB checkpoint takes seconds to a minute, so a weight file's digest is remembered by
(resolved path, size, mtime in ns), in the process and in `<root>/file_digests.json`: rewriting a file (a retrained
encoder of the same size) changes its mtime and is hashed again.
Shards are written to a temporary name and renamed; the index is rewritten atomically after each shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medsynapse.model.encoders import encoder_settings
from medsynapse.model.encoders.base import PriorOutput

_MIB = 2**20
INDEX = "index-2.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DIGESTS: dict[str, str] = {}  # "path:size:mtime_ns" -> sha256 of the file, for this process


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(16 * _MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    """SHA-256 of the whole file, remembered by (resolved path, size, mtime_ns) in `memo` (default: the process's)."""
    memo = _DIGESTS if memo is None else memo
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in memo:
        memo[key] = _hash_file(path)
    return memo[key]


def encoder_fingerprint(folder: str | Path, memo: dict[str, str] | None = None) -> str:
    folder = Path(folder).expanduser()
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{file_digest(path, memo)}".encode())
    settings = encoder_settings(folder)
    if settings:  # only encoders with code-level defaults: the fingerprints of other folders stay as they were
        digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def image_key(path: str | Path) -> str:
    """SHA-256 of the image file's bytes; a NIfTI volume's view (`ct.nii.gz#slice=40`) is part of the key, so
    every slice of one volume has its own features."""
    from medsynapse.data.views import split_view

    file, fragment = split_view(str(path))
    digest = file_digest(Path(file)) if fragment else hashlib.sha256(Path(file).read_bytes()).hexdigest()  # a
    # volume is hashed once for all its views (remembered by path, size and mtime)
    return hashlib.sha256(f"{digest}#{fragment}".encode()).hexdigest() if fragment else digest


def _load_digests(path: Path) -> dict[str, str]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-written by a killed process: only a speed-up is lost
        return {}
    return memo if isinstance(memo, dict) else {}


def _save_digests(path: Path, memo: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, sort_keys=True))
    os.replace(tmp, path)


class PriorCache:
    def __init__(self, root: str | Path, encoder_folder: str | Path):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        digests_path = root / "file_digests.json"
        memo = {**_load_digests(digests_path), **_DIGESTS}
        known = dict(memo)
        fingerprint = encoder_fingerprint(encoder_folder, memo)
        _DIGESTS.update(memo)
        if memo != known:
            _save_digests(digests_path, memo)
        self.dir = root / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        index_path = self.dir / INDEX
        self.index: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """(tokens, region mask, grid, finding or None) of one image."""
        shard = self.index[key]
        if shard not in self._loaded:
            self._loaded[shard] = load_file(str(self.dir / shard))
        tensors = self._loaded[shard]
        grid = tensors[f"{key}.grid"]
        finding = tensors.get(f"{key}.finding")
        return (tensors[f"{key}.tokens"], tensors[f"{key}.region"].bool(), (int(grid[0]), int(grid[1])),
                finding.bool() if finding is not None else None)

    def put(self, keys: list[str], prior: PriorOutput) -> None:
        """Write one shard holding these images' features, then the index."""
        shard = f"shard_{len(set(self.index.values())):05d}.safetensors"
        grid = torch.tensor(prior.grid)
        tensors = {}
        for i, key in enumerate(keys):
            tensors[f"{key}.tokens"] = prior.tokens[i].detach().cpu().contiguous().clone()  # own storage: safetensors
            tensors[f"{key}.region"] = prior.region_mask[i].cpu().to(torch.uint8).clone()  # refuses shared views
            tensors[f"{key}.grid"] = grid.clone()
            if prior.finding is not None:
                tensors[f"{key}.finding"] = prior.finding[i].cpu().to(torch.uint8).reshape(()).clone()
        tmp = self.dir / (shard + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.dir / shard)
        self.index.update({key: shard for key in keys})
        index_tmp = self.dir / (INDEX + ".tmp")
        index_tmp.write_text(json.dumps(self.index))
        index_tmp.replace(self.dir / INDEX)
