"""SLAKE (English) test split from the original `Slake1.0/` or the HF `BoKelvin/SLAKE` copy (same records).

Closed-ended: `answer_type == "CLOSED"` among `q_lang == "en"` (416 of 1,061 English test questions). Yes/no answers
use the yes/no rule; other closed answers ("Lung", "T2", "right") are an exact match after normalisation.
The `split` argument also reads the training split for Stage II (open-ended questions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import (
    SHORT_ANSWER_INSTRUCTION,
    BadRecords,
    Benchmark,
    closed_sample,
    image_path,
    read_json_list,
    require,
    source_folder,
)

SPLIT_FILES = {"test": ["test.json"], "train": ["train.json"], "validation": ["validation.json", "validate.json"]}

FOLDERS = ("slake", "Slake1.0", "Slake", "SLAKE")


def read_records(root: Path, split: str) -> tuple[Path, list]:
    for name in SPLIT_FILES[split]:
        path = root / name
        if path.is_file():
            return path, read_json_list(path)
    raise DataError(f"{root}: no SLAKE {split} file (looked for {', '.join(SPLIT_FILES[split])})")


def load(data_root: Path, store, bad: BadRecords, split: str = "test", answer_type: str = "CLOSED",
         language: str = "en", folder: str | None = None) -> Benchmark:
    """`answer_type`: "CLOSED" (evaluation), "OPEN" (the open-ended training questions) or "" for all."""
    root = source_folder(data_root, FOLDERS, folder)
    path, records = read_records(root, split)
    samples: list[Sample] = []
    excluded = {f"language not {language!r}": 0, f"answer_type not {answer_type}": 0}
    for index, record in enumerate(records):
        rid = record.get("qid", index) if isinstance(record, dict) else index
        where = f"{path}, record {index + 1} (qid {rid!r})"
        try:
            if language and require(record, "q_lang", where, str) != language:
                excluded[f"language not {language!r}"] += 1
                continue
            kind = require(record, "answer_type", where, str).strip().upper()
            if answer_type and kind != answer_type:
                excluded[f"answer_type not {answer_type}"] += 1
                continue
            image = image_path(root / "imgs", require(record, "img_name", where, str), where, "img_name")
            question = require(record, "question", where, str)
            answer = str(require(record, "answer", where)).strip()
            extra: dict[str, Any] = {"modality": str(record.get("modality", "")),
                                     "question_type": str(record.get("content_type", "")),
                                     "groups": {"base_type": str(record.get("base_type", "")), "answer_type": kind}}
            if kind == "CLOSED":
                samples.append(closed_sample(f"slake-{rid}", [image], question, answer, **extra))
            else:
                samples.append(Sample(f"slake-{rid}", [image], question, answer, "open",
                                      prompt=f"{question}\n{SHORT_ANSWER_INSTRUCTION}", **extra))
        except DataError as err:
            bad.handle(err, str(rid))
    definition = (f"{split} split, q_lang == {language!r}, answer_type == {answer_type or 'any'}; yes/no answers by "
                  "the whole-word yes/no rule, other closed answers by normalised exact match")
    return Benchmark("slake", str(path), definition, samples, len(records), excluded, bad.skipped)
