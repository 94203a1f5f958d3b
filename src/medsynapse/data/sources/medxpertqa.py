"""MedXpertQA multimodal (`MM/test.jsonl`, 2,000 five-option questions, all scored; "Total" accuracy).

The question text already ends with "Answer Choices: (A) ... (E) ...", so the options are not listed again (MedEvalKit
does, and the model then sees them twice). Prompt: the official zero-shot template and system message. Multi-image
questions pass every image. Also reads the repo's own input layout (options as [{letter, content}], label as a list,
images as [{image_path}]).
"""

from __future__ import annotations

import json
from pathlib import Path

from medsynapse.data.schema import DataError
from medsynapse.data.sources.common import BadRecords, Benchmark, image_path, mcq_sample, require, source_folder

SYSTEM = "You are a helpful medical assistant."  # the official system prompt (MXQ:eval/config/prompt_templates.py)

FOLDERS = ("medxpertqa", "MedXpertQA")


def _options(value: object, where: str) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(o, dict) and "letter" in o and "content" in o for o in value):
        return {str(o["letter"]): str(o["content"]) for o in value}
    raise DataError(f"{where}: field 'options' must map letters to texts")


def _label(value: object, where: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'label' must be one letter")
    return value.strip().upper()


def load(data_root: Path, store, bad: BadRecords, split: str = "test", folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    path = root / "MM" / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: MedXpertQA MM file not found")
    samples, n_records = [], 0
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            n_records += 1
            where = f"{path}, record {line_no}"
            rid = str(line_no)
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from None
                rid = str(record.get("id", line_no)) if isinstance(record, dict) else rid
                where += f" (id {rid!r})"
                names = [i["image_path"] if isinstance(i, dict) else i for i in require(record, "images", where, list)]
                if not names:
                    raise DataError(f"{where}: field 'images' is empty")
                images = [image_path(root / "images", Path(str(n)).name, where, "images") for n in names]
                question = require(record, "question", where, str)
                samples.append(mcq_sample(
                    require(record, "id", where, str), images, question, _options(require(record, "options", where),
                                                                                  where),
                    _label(require(record, "label", where), where), where,
                    prompt=f"Q: {question}\nA: Among A through E, the answer is", system=SYSTEM,
                    question_type=str(record.get("question_type", "")),
                    groups={"medical_task": str(record.get("medical_task", "")),
                            "body_system": str(record.get("body_system", ""))}))
            except DataError as err:
                bad.handle(err, rid)
    return Benchmark("medxpertqa-mm", str(path), f"all MM {split} questions (5-option multiple choice); Total "
                     "accuracy over Reasoning + Understanding", samples, n_records, {}, bad.skipped)
