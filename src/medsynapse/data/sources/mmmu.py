"""MMMU Health & Medicine validation (150 questions: 145 multiple choice + 5 open) from per-subject parquet files.

All questions are scored (the official MMMU accuracy). Options are the string repr of a Python list (parsed with
`ast.literal_eval`, never `eval`); `<image n>` tags in the question and in the options (some options are images)
become "[image n]" and every present image (1-7) is
passed, in order. Open questions use MMMU's own open-answer rule (`mmmu_open` in answers.py). The one
difference from the official scorer: no random letter when nothing parses (counted unparseable instead).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import (
    LETTERS,
    MCQ_INSTRUCTION,
    SHORT_ANSWER_INSTRUCTION,
    BadRecords,
    Benchmark,
    ImageStore,
    image_bytes,
    mcq_sample,
    read_parquet_rows,
    render_options,
    require,
    source_folder,
)

SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
            "Public_Health")
_IMAGE_TAG = re.compile(r"<image (\d)>")

FOLDERS = ("mmmu", "MMMU")


def parse_options(value: object, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: field 'options' is not a list literal: {str(value)[:80]!r}") from None
    if not isinstance(parsed, list):
        raise DataError(f"{where}: field 'options' must be a list, got {type(parsed).__name__}")
    return [str(v) for v in parsed]


def load(data_root: Path, store: ImageStore, bad: BadRecords, split: str = "validation",
         folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    files = [f for subject in SUBJECTS for f in sorted((root / subject).glob(f"{split}-*.parquet"))]
    if not files:
        raise DataError(f"{root}: no MMMU {split} parquet for any of {', '.join(SUBJECTS)}")
    missing = [s for s in SUBJECTS if not any(f.parent.name == s for f in files)]
    samples: list[Sample] = []
    n_records = 0
    for path in files:
        rows = read_parquet_rows(path)
        n_records += len(rows)
        for index, row in enumerate(rows):
            rid = row.get("id", index)
            where = f"{path}, record {index + 1} (id {rid!r})"
            try:
                samples.append(_sample(row, path.parent.name, where, store))
            except DataError as err:
                bad.handle(err, str(rid))
    definition = "all validation questions of the Health & Medicine subjects (multiple choice + open)"
    if missing:
        definition += f"; subjects not found: {', '.join(missing)}"
    return Benchmark("mmmu-med", ", ".join(str(f) for f in files), definition, samples, n_records, {}, bad.skipped)


def _sample(row: dict, subject: str, where: str, store: ImageStore) -> Sample:
    sample_id = require(row, "id", where, str)
    question = _IMAGE_TAG.sub(r"[image \1]", require(row, "question", where, str))
    images = [store.put(image_bytes(row[f"image_{k}"], where, f"image_{k}")) for k in range(1, 8)
              if row.get(f"image_{k}") is not None]
    if not images:
        raise DataError(f"{where}: field 'image_1': no image in image_1..image_7")
    answer = str(require(row, "answer", where)).strip()
    extra: dict[str, Any] = {"question_type": str(row.get("question_type", "")), "groups": {"subject": subject,
                             "difficulty": str(row.get("topic_difficulty", ""))}}
    if require(row, "question_type", where, str) == "multiple-choice":
        texts = [_IMAGE_TAG.sub(r"[image \1]", t) for t in parse_options(require(row, "options", where), where)]
        options = dict(zip(LETTERS, texts, strict=False))
        prompt = f"{question}\n\n{render_options(options, 'paren')}\n\n{MCQ_INSTRUCTION}"
        return mcq_sample(sample_id, images, question, options, answer.upper(), where, prompt=prompt, **extra)
    return Sample(sample_id, images, question, answer, "mmmu_open",
                  prompt=f"{question}\n\n{SHORT_ANSWER_INSTRUCTION}", **extra)
