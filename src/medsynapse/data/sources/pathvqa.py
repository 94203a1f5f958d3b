"""PathVQA from the HF parquet copy (`flaviagiammarino/path-vqa`) or the original pickles (`pvqa/qas/...`).

Closed-ended: answer in {yes, no} (3,362 of 6,719 test questions); neither copy has an answer-type field. The
original pickles are read with an unpickler that refuses every class (plain lists, dicts and strings only).
`open_only=True` keeps the non-yes/no questions instead (the open-ended training split for Stage II).
"""

from __future__ import annotations

from pathlib import Path

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import (
    SHORT_ANSWER_INSTRUCTION,
    BadRecords,
    Benchmark,
    ImageStore,
    closed_sample,
    describe,
    image_bytes,
    image_path,
    is_yes_no,
    parquet_records,
    read_plain_pickle,
    require,
    source_folder,
)

HF_SPLITS = {"test": "test", "train": "train", "validation": "validation"}
PICKLE_SPLITS = {"test": "test", "train": "train", "validation": "val"}

HF_FOLDERS = ("path_vqa", "path-vqa")  # ours, then as published
PICKLE_FOLDERS = ("pvqa",)


def _sample(sample_id: str, image: str, question: str, answer: str, open_only: bool) -> Sample:
    if open_only:
        return Sample(sample_id, [image], question, answer, "open", prompt=f"{question}\n{SHORT_ANSWER_INSTRUCTION}")
    return closed_sample(sample_id, [image], question, answer)


def load(data_root: Path, store: ImageStore, bad: BadRecords, split: str = "test",
         open_only: bool = False, folder: str | None = None) -> Benchmark:
    """`folder`: one folder holding either copy (the HF `data/` shards, or the original `qas/` + `images/`)."""
    hf = sorted((source_folder(data_root, HF_FOLDERS, folder) / "data").glob(f"{HF_SPLITS[split]}-*.parquet"))
    original = source_folder(data_root, PICKLE_FOLDERS, folder)
    pickled = original / "qas" / PICKLE_SPLITS[split] / f"{PICKLE_SPLITS[split]}_qa.pkl"
    if hf:
        path, located = hf[0], parquet_records(hf)
    elif pickled.is_file():
        path, rows = pickled, read_plain_pickle(pickled)
        if not isinstance(rows, list):
            raise DataError(f"{pickled}: expected a list of records")
        located = [(f"{pickled}, record {index + 1}", row) for index, row in enumerate(rows)]
    else:
        hf_folder = source_folder(data_root, HF_FOLDERS, folder) / "data"
        raise DataError(f"{folder or data_root}: no PathVQA {split} split (looked for "
                        f"{hf_folder}/{HF_SPLITS[split]}-*.parquet and {pickled})")
    keep = "open (answer not yes/no)" if open_only else "closed (answer in {yes, no})"
    samples, excluded = [], {"not " + keep: 0}
    for index, (where, row) in enumerate(located):
        try:
            answer = str(require(row, "answer", where)).strip()
            if is_yes_no(answer) == open_only:
                excluded["not " + keep] += 1
                continue
            question = require(row, "question", where, str)
            if path.suffix == ".parquet":
                image = store.put(image_bytes(require(row, "image", where), where))
            else:
                name = require(row, "image", where, str)
                image = image_path(original / "images" / PICKLE_SPLITS[split], f"{name}.jpg", where)
            samples.append(_sample(f"pathvqa-{split}-{index}", image, question, answer, open_only))
        except DataError as err:
            bad.handle(err, f"{split}-{index}")
    source = describe(hf) if hf else str(path)
    return Benchmark("pathvqa", source, f"{split} split; kept: {keep} (no answer-type field in PathVQA)", samples,
                     len(located), excluded, bad.skipped)
