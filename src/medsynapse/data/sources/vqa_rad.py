"""VQA-RAD test split: the OSF original (JSON + image folder) or the HF parquet copy (`flaviagiammarino/vqa-rad`).

Closed-ended: OSF rows with `answer_type == "CLOSED"` (272 of 451); the HF copy has no answer type, so there closed
means a yes/no answer (251 of 451). The two definitions give different numbers; the one used is recorded.
"""

from __future__ import annotations

from pathlib import Path

from medsynapse.data.schema import DataError
from medsynapse.data.sources.common import (
    BadRecords,
    Benchmark,
    ImageStore,
    closed_sample,
    describe,
    image_bytes,
    image_path,
    is_yes_no,
    parquet_records,
    read_json_list,
    require,
    source_folder,
)

OSF_FILE = "VQA_RAD Dataset Public.json"
OSF_IMAGES = "VQA_RAD Image Folder"

OSF_FOLDERS = ("vqa_rad", "VQA_RAD")  # ours, then as published
HF_FOLDERS = ("vqa_rad_hf", "vqa-rad")


def load(data_root: Path, store: ImageStore, bad: BadRecords, layout: str = "auto",
         folder: str | None = None) -> Benchmark:
    """`layout`: "osf", "hf", or "auto" (the OSF original when present, else the HF copy). `folder`: one folder
    holding either copy (the OSF file, or the HF `data/` shards) instead of the two under the data root."""
    if layout not in ("auto", "osf", "hf"):
        raise ValueError(f"VQA-RAD layout must be auto, osf or hf, got {layout!r}")
    osf = source_folder(data_root, OSF_FOLDERS, folder) / OSF_FILE
    if osf.is_file() and layout != "hf":
        return load_osf(osf, bad)
    hf = sorted((source_folder(data_root, HF_FOLDERS, folder) / "data").glob("test-*.parquet"))
    if hf and layout != "osf":
        return load_hf(hf, store, bad)
    where = folder or data_root
    raise DataError(f"{where}: no VQA-RAD copy found (looked for {'/'.join(OSF_FOLDERS)}/{OSF_FILE} and "
                    f"{'/'.join(HF_FOLDERS)}/data/test-*.parquet)" if folder is None else
                    f"{where}: no VQA-RAD copy found (looked for {OSF_FILE} and data/test-*.parquet)")


def load_osf(path: Path, bad: BadRecords) -> Benchmark:
    records = read_json_list(path)
    samples, excluded = [], {"train split": 0, "open-ended (answer_type OPEN)": 0}
    for index, record in enumerate(records):
        rid = record.get("qid", index) if isinstance(record, dict) else index
        where = f"{path}, record {index + 1} (qid {rid!r})"
        try:
            if not str(require(record, "phrase_type", where, str)).startswith("test"):
                excluded["train split"] += 1
                continue
            if str(require(record, "answer_type", where, str)).strip().upper() != "CLOSED":
                excluded["open-ended (answer_type OPEN)"] += 1
                continue
            image = image_path(path.parent / OSF_IMAGES, require(record, "image_name", where, str), where,
                               "image_name")
            samples.append(closed_sample(
                f"vqa-rad-{rid}", [image], require(record, "question", where, str),
                str(require(record, "answer", where)).strip(),  # some answers are not strings: cast
                question_type=str(record.get("question_type", "")),
                groups={"organ": str(record.get("image_organ", ""))}))
        except DataError as err:
            bad.handle(err, str(rid))
    return Benchmark("vqa-rad", str(path), "OSF test rows (phrase_type starts with 'test') with answer_type == CLOSED",
                     samples, len(records), excluded, bad.skipped)


def load_hf(paths: list[Path], store: ImageStore, bad: BadRecords) -> Benchmark:
    located, path = parquet_records(paths), describe(paths)
    samples, excluded = [], {"open-ended (answer not yes/no)": 0}
    for index, (where, row) in enumerate(located):
        try:
            answer = str(require(row, "answer", where)).strip()
            if not is_yes_no(answer):
                excluded["open-ended (answer not yes/no)"] += 1
                continue
            image = store.put(image_bytes(require(row, "image", where), where))
            samples.append(closed_sample(f"vqa-rad-test-{index}", [image], require(row, "question", where, str),
                                         answer))
        except DataError as err:
            bad.handle(err, f"test-{index}")
    return Benchmark("vqa-rad", path, "HF parquet test split; closed = answer in {yes, no} (no answer_type "
                     "column in this copy)", samples, len(located), excluded, bad.skipped)
