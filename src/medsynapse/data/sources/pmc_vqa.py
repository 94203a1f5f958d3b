"""PMC-VQA test set from the v1 CSVs (`test_clean.csv`, 2,000 rows, the set papers report; or `test.csv`) or v2.

Every row is a 4-option multiple-choice question (all scored). Quirks handled: the answer column is spelt `Answer` or
`Anwser`; choices carry a letter prefix (`B:Focal uptake pattern`); images sit under `images/` or `figures/`; rows
without `Answer_label` (v2) get the letter of the option whose text equals the answer.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from medsynapse.data.schema import DataError
from medsynapse.data.sources.common import BadRecords, Benchmark, letter_of, mcq_sample, require, source_folder

_PREFIX = re.compile(r"^\s*\(?([A-D])\)?\s*[:.]\s*")
IMAGE_DIRS = ("images", "figures", "images_2", ".")

FOLDERS = ("pmc_vqa", "PMC-VQA")


def _find_image(root: Path, name: str, where: str) -> str:
    for folder in IMAGE_DIRS:
        path = root / folder / name
        if path.is_file():
            return str(path.resolve())
    raise DataError(f"{where}: field 'Figure_path': image {name!r} not found under {', '.join(IMAGE_DIRS)}")


def strip_prefix(choice: str) -> str:
    return _PREFIX.sub("", choice, count=1).strip()


def load(data_root: Path, store, bad: BadRecords, file: str = "test_clean.csv",
         folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    path = root / file
    if not path.is_file():
        raise DataError(f"{path}: PMC-VQA file not found (the 2,000-question set is test_clean.csv)")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    samples = []
    for index, row in enumerate(rows):
        where = f"{path}, record {index + 1}"  # data rows from 1 (the header is not a record)
        try:
            name = require(row, "Figure_path", where, str)
            options = {}
            for letter in "ABCD":
                value = row.get(f"Choice {letter}")
                if value is None or not value.strip():
                    raise DataError(f"{where}: missing field 'Choice {letter}'")
                options[letter] = strip_prefix(value)
            label = (row.get("Answer_label") or "").strip().upper()
            if not label:
                answer_column = "Answer" if "Answer" in row else "Anwser"
                label = letter_of(strip_prefix(require(row, answer_column, where, str)), options, where)
            samples.append(mcq_sample(f"pmc-vqa-{index}", [_find_image(root, name, where)],
                                      require(row, "Question", where, str).strip(), options, label, where))
        except DataError as err:
            bad.handle(err, str(index))
    return Benchmark("pmc-vqa", str(path), f"all rows of {file}: 4-option multiple choice", samples, len(rows), {},
                     bad.skipped)
