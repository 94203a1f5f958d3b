"""What every dataset loader shares: the loaded-benchmark record, bad-record handling, embedded-image storage, prompts.

Loaders read the published local layouts (no hub access at run time) into the one `Sample` schema. A malformed
record raises `DataError` naming the file, the record and the field, unless the caller asked to skip bad records; then
the record is counted and listed, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medsynapse.answers import normalise
from medsynapse.data.schema import DataError, Sample

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please output 'yes' or 'no'(no extra output)."  # MedEvalKit's closed prompt, verbatim
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."  # lmms-eval / MMMU open prompt
LETTERS = "ABCDEFGHIJKLMN"


@dataclass
class Benchmark:
    """The scored subset of one dataset, with the rule that chose it and what was left out (and why)."""

    name: str
    source: str  # the file(s) read
    closed_definition: str  # which questions are scored; recorded with every result
    samples: list[Sample]
    n_records: int  # records read before filtering
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> count (filtered on purpose)
    skipped: list[dict] = field(default_factory=list)  # bad records passed over with --skip-bad: {id, error}
    scorable: bool = True  # False for splits without public answers (GMAI-MMBench TEST)
    max_new_tokens: int = 32  # the protocol's answer budget (overridable per run)

    def drop_duplicate_ids(self, bad: BadRecords) -> None:
        """Ids key the resumable predictions: a repeated id is a bad record (an error, or skipped and listed)."""
        counts = Counter(s.id for s in self.samples)
        if all(c == 1 for c in counts.values()):
            return
        seen: set[str] = set()
        kept = []
        for sample in self.samples:
            if sample.id in seen:
                bad.handle(DataError(f"{self.source}: duplicate sample id {sample.id!r} (field 'id')"), sample.id)
                continue
            seen.add(sample.id)
            kept.append(sample)
        self.samples = kept


class BadRecords:
    """Raise on a bad record, or (with `skip=True`) remember it and go on."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.skipped: list[dict] = []

    def handle(self, error: DataError, record_id: str) -> None:
        if not self.skip:
            raise error
        self.skipped.append({"id": record_id, "error": str(error)})


def require(record: dict, name: str, where: str, kinds: type | tuple[type, ...] = object):
    """A record's field, or a DataError naming where it is and which field is missing or mistyped."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kinds):
        names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field '{name}' must be {names}, got {type(value).__name__}")
    return value


class ImageStore:
    """Writes images embedded in data files (parquet bytes, base64 TSV cells) to disk once, named by content hash.

    Samples then carry plain paths like every other layout, and the prior-feature cache (keyed by content) works
    unchanged. Writes are atomic, so an interrupted run never leaves half an image behind.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:3] == b"\xff\xd8\xff" else ".img"
        path = self.root / digest[:2] / f"{digest}{suffix}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)


def image_bytes(cell: object, where: str, name: str = "image") -> bytes:
    """The bytes of an HF `Image` parquet cell ({bytes, path} struct) or of raw bytes."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, bytes | bytearray) or not cell:
        raise DataError(f"{where}: field '{name}' holds no image bytes")
    return bytes(cell)


def read_json_list(path: Path) -> list:
    """A JSON file holding a list of records (a byte-order mark is tolerated)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return records


def read_parquet_rows(paths: Path | list[Path]) -> list[dict]:
    """Rows of one parquet file, or of a split's shards (`test-00000-of-00003...`) in order."""
    return [row for _, row in parquet_records([paths] if isinstance(paths, Path) else paths)]


def parquet_records(paths: list[Path]) -> list[tuple[str, dict]]:
    """Each row of a split's shards, in order, with where it is: "<shard>, record N" (N from 1 within that shard), so
    an error names the shard at fault rather than the first one."""
    import pyarrow.parquet as pq

    out: list[tuple[str, dict]] = []
    for path in paths:
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for bad files
            raise DataError(f"{path}: unreadable parquet file: {err}") from None
        out += [(f"{path}, record {index + 1}", row) for index, row in enumerate(rows)]
    return out


def source_folder(data_root: Path, names: tuple[str, ...], folder: str | Path | None = None) -> Path:
    """A benchmark's folder: `folder` when given (`--path BENCHMARK=DIR`, any place on disk), else the first of
    `names` that exists under `data_root` (our name first, then the names the benchmark is published under, e.g.
    `Slake1.0/`), else our name (the loader's error then says what it looked for)."""
    if folder is not None and str(folder) != "":
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise DataError(f"{path}: not a folder (given as this benchmark's path)")
        return path
    for name in names:
        if (data_root / name).is_dir():
            return data_root / name
    return data_root / names[0]


def describe(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every class: the original PathVQA pickles hold only lists, dicts and strings, and a pickle that asks
    for anything else could run code."""

    def find_class(self, module: str, name: str):
        raise DataError(f"refusing to unpickle {module}.{name}: only plain lists/dicts/strings are allowed")


def read_plain_pickle(path: Path):
    with path.open("rb") as handle:
        try:
            return _PlainDataUnpickler(handle).load()
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        except Exception as err:
            raise DataError(f"{path}: unreadable pickle: {err}") from None


def is_yes_no(answer: str) -> bool:
    return normalise(answer) in ("yes", "no")


def closed_sample(sample_id: str, images: list[str], question: str, answer: str, **extra) -> Sample:
    """A closed-ended question: yes/no answers get the yes/no prompt and rule, other closed answers exact match."""
    if is_yes_no(answer):
        return Sample(sample_id, images, question, normalise(answer), "yes_no",
                      prompt=f"{question}\n{YES_NO_INSTRUCTION}", **extra)
    return Sample(sample_id, images, question, answer, "open", prompt=f"{question}\n{SHORT_ANSWER_INSTRUCTION}",
                  **extra)


def render_options(options: dict[str, str], style: str = "dot") -> str:
    """Option lines: `A. text` (dot) or `(A) text` (paren, the MMMU layout)."""
    if style == "paren":
        return "\n".join(f"({k}) {v}" for k, v in options.items())
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def mcq_sample(sample_id: str, images: list[str], question: str, options: dict[str, str], answer_letter: str,
               where: str, prompt: str | None = None, **extra) -> Sample:
    """A multiple-choice sample; the gold letter must be one of the options."""
    if answer_letter not in options:
        raise DataError(f"{where}: field 'answer' {answer_letter!r} is not one of the options {sorted(options)}")
    prompt = prompt if prompt is not None else f"{question}\n{render_options(options)}\n{MCQ_INSTRUCTION}"
    return Sample(sample_id, images, question, answer_letter, "multiple_choice", options=options, prompt=prompt,
                  **extra)


def letter_of(text: str, options: dict[str, str], where: str) -> str:
    """The letter of the option whose text is `text` (exact, then normalised); an error if none or several."""
    exact = [k for k, v in options.items() if v == text]
    if len(exact) == 1:
        return exact[0]
    loose = [k for k, v in options.items() if normalise(v) == normalise(text)]
    if len(loose) == 1:
        return loose[0]
    raise DataError(f"{where}: field 'answer' {text!r} matches {len(loose)} options, expected exactly one")


def image_path(root: Path, relative: str, where: str, name: str = "image") -> str:
    """A path under `root` (a leading '/' in the record is treated as relative); must exist."""
    path = root / relative.lstrip("/")
    if not path.is_file():
        raise DataError(f"{where}: field '{name}': image not found at {path}")
    return str(path.resolve())
