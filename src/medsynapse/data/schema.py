"""One sample schema for every data source (SynthMed now, the public benchmarks later).

Records live in JSON-lines files; image paths are relative to the file's folder. Reading validates every field and
names the file, the record and the field on failure, so a bad record never turns into a silent skip.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medsynapse.data.errors import DataError
from medsynapse.data.views import split_view, volume_entry

ANSWER_TYPES = ("yes_no", "multiple_choice", "open", "mmmu_open", "caption")


@dataclass
class Sample:
    id: str
    images: list[str]
    question: str
    answer: str
    answer_type: str
    options: dict[str, str] = field(default_factory=dict)
    modality: str = ""
    question_type: str = ""
    family: str = ""
    mask: str | None = None
    prompt: str = ""  # the text the model sees (benchmark protocol applied); empty means `question`
    groups: dict[str, str] = field(default_factory=dict)  # extra breakdown columns (e.g. GMAI department)
    system: str = ""  # a system message the protocol prescribes (MedXpertQA), else none
    rationale: list[str] = field(default_factory=list)  # reasoning steps (CoT-SFT, Coconut, IVT-LR); may be empty

    @property
    def model_prompt(self) -> str:
        return self.prompt or self.question

    def to_record(self) -> dict:
        return asdict(self)


_REQUIRED = {"id": str, "images": list, "question": str, "answer": str, "answer_type": str}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "options": dict, "modality": str, "question_type": str, "family": str, "mask": (str, type(None)),
    "prompt": str, "groups": dict, "system": str, "rationale": list}


def sample_from_record(record: object, source: str, line: int) -> Sample:
    """Validate one decoded record; `source`/`line` only feed the error message."""
    where = f"{source}, record {line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is not None:
        where += f" (id {rid!r})"
    for name, kind in _REQUIRED.items():
        if name not in record:
            raise DataError(f"{where}: missing field '{name}'")
        if not isinstance(record[name], kind):
            raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(record[name]).__name__}")
    for name, kinds in _OPTIONAL.items():
        if name in record and not isinstance(record[name], kinds):
            raise DataError(f"{where}: field '{name}' has the wrong type {type(record[name]).__name__}")
    unknown = set(record) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}")
    if record["answer_type"] not in ANSWER_TYPES:
        raise DataError(f"{where}: field 'answer_type' must be one of {ANSWER_TYPES}, got {record['answer_type']!r}")
    if any(isinstance(p, dict) for p in record["images"]):  # a NIfTI volume and its view -> "ct.nii.gz#slice=40"
        record = {**record, "images": [volume_entry(p, f"{where}, field 'images'") if isinstance(p, dict) else p
                                       for p in record["images"]]}
    if not record["images"] or not all(isinstance(p, str) and p for p in record["images"]):
        raise DataError(f"{where}: field 'images' must be a non-empty list of paths (or of volume entries "
                        "{\"path\": \"ct.nii.gz\", \"slice\": 40})")
    if not all(isinstance(step, str) and step.strip() for step in record.get("rationale", [])):
        raise DataError(f"{where}: field 'rationale' must be a list of non-empty strings (the reasoning steps)")
    if record["answer_type"] == "multiple_choice" and record["answer"] not in record.get("options", {}):
        raise DataError(f"{where}: field 'answer' {record['answer']!r} is not one of the option letters")
    return Sample(**record)


def read_samples(path: str | Path) -> list[Sample]:
    """Read a JSON-lines file of samples; image and mask paths are made absolute against the file's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, record {line_no}: not valid JSON ({err.msg})") from None
            sample = sample_from_record(record, str(path), line_no)
            sample.images = [_absolute(path.parent, p) for p in sample.images]
            if sample.mask is not None:
                sample.mask = str((path.parent / sample.mask).resolve())
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no records")
    return samples


def _absolute(folder: Path, image: str) -> str:
    """An image path made absolute against the data file's folder; a volume's view fragment is kept."""
    file, fragment = split_view(image)
    resolved = str((folder / file).resolve())
    return f"{resolved}#{fragment}" if fragment else resolved


def write_samples(path: str | Path, samples: list[Sample]) -> None:
    """Write samples atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample.to_record()) + "\n")
    tmp.replace(path)
