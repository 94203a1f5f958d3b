"""HuatuoGPT-Vision's closed-ended evaluation bundle (`Medical_Multimodal_Evaluation_Data`): VQA-RAD, SLAKE, PathVQA,
PMC-VQA, OmniMedVQA and MMMU-Med closed questions, all as multiple choice.

Scored: every row except `question_type == "open"` and rows whose answer is '?' (no gold; both counted as excluded).
The answer is an option text; it becomes the option's letter. Accuracy is also broken down per `dataset`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from medsynapse.data.schema import DataError
from medsynapse.data.sources.common import (
    LETTERS,
    BadRecords,
    Benchmark,
    image_path,
    letter_of,
    mcq_sample,
    read_json_list,
    require,
    source_folder,
)

FILE = "medical_multimodel_evaluation_data.json"  # sic: "multimodel" is the published file name

FOLDERS = ("medical_multimodal_eval",)


def _options(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: field 'options' is not a list literal") from None
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: field 'options' must be a list of at least two texts")
    return [str(v) for v in value]


def load(data_root: Path, store, bad: BadRecords, folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    path = root / FILE
    if not path.is_file():
        raise DataError(f"{path}: HuatuoGPT-Vision evaluation bundle not found")
    records = read_json_list(path)
    samples, excluded = [], {"question_type == 'open'": 0, "no gold answer ('?')": 0}
    for index, record in enumerate(records):
        where = f"{path}, record {index + 1}"
        try:
            if isinstance(record, dict) and record.get("question_type") == "open":
                excluded["question_type == 'open'"] += 1
                continue
            answer = str(require(record, "answer", where)).strip()
            if answer == "?":
                excluded["no gold answer ('?')"] += 1
                continue
            options = dict(zip(LETTERS, _options(require(record, "options", where), where), strict=False))
            images = [image_path(root, str(p), where, "image") for p in require(record, "image", where, list)]
            if not images:
                raise DataError(f"{where}: field 'image' is empty")
            dataset = require(record, "dataset", where, str)
            samples.append(mcq_sample(f"hgv-{index}", images, require(record, "question", where, str), options,
                                      letter_of(answer, options, where), where, question_type=dataset,
                                      groups={"dataset": dataset, "subset": str(record.get("subset", ""))}))
        except DataError as err:
            bad.handle(err, str(index))
    return Benchmark("hgv-bundle", str(path), "all closed rows as multiple choice (question_type 'open' and '?' "
                     "answers excluded)", samples, len(records), excluded, bad.skipped)
