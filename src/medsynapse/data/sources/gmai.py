"""GMAI-MMBench from VLMEvalKit-style TSVs: VAL (`GMAI-MMBench_VAL.tsv`, ≈4.55k MCQs with answers, all scored) or
TEST (`GMAI_mm_bench_TEST_part_*.tsv`, no answers: loaded and flagged unscorable).

Images are base64 cells; a cell of at most 64 characters is the `index` of another row whose image it reuses. Options
are the non-empty columns A-E. Prompt: VLMEvalKit's ImageMCQ template. Group columns (clinical VQA task, department,
perceptual granularity; header case varies) become breakdowns.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from pathlib import Path

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import (
    BadRecords,
    Benchmark,
    ImageStore,
    mcq_sample,
    render_options,
    require,
    source_folder,
)

VAL_FILES = ("GMAI-MMBench_VAL.tsv", "GMAI_mm_bench_VAL.tsv")
GROUP_COLUMNS = ("clinical vqa task", "department", "perceptual granularity", "modality", "category")

FOLDERS = ("gmai", "GMAI-MMBench", "LMUData")  # ours, then as published (VLMEvalKit keeps its TSVs in LMUData/)


def prompt_for(row: dict, options: dict[str, str]) -> str:
    hint = (row.get("hint") or "").strip()
    text = f"Hint: {hint}\n" if hint and hint.lower() != "nan" else ""
    return (f"{text}Question: {row['question']}\nOptions:\n{render_options(options)}\n"
            "Please select the correct answer from the options above. \n")


def _rows(path: Path):
    """Stream rows with lower-cased headers (the VAL file is 9 GB: never held in memory at once)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 kB default
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            yield {(k or "").strip().lower(): (v if v is not None else "") for k, v in row.items()}


def _store_images(path: Path, store: ImageStore) -> dict[str, str]:
    """First pass: decode every full image cell to the image store; returns row index -> image path."""
    paths: dict[str, str] = {}
    for row in _rows(path):
        cell = row.get("image", "").strip()
        if len(cell) > 64:
            try:
                paths[row.get("index", "")] = store.put(base64.b64decode(cell, validate=True))
            except (binascii.Error, ValueError):
                paths[row.get("index", "")] = ""  # reported (or skipped) with its record in the second pass
    return paths


def load(data_root: Path, store: ImageStore, bad: BadRecords, split: str = "val",
         folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    if split == "val":
        paths = [root / n for n in VAL_FILES if (root / n).is_file()][:1]
    else:
        paths = sorted(root.glob("GMAI_mm_bench_TEST_part_*.tsv"))
    if not paths:
        raise DataError(f"{root}: no GMAI-MMBench {split} TSV (looked for {', '.join(VAL_FILES)} / "
                        "GMAI_mm_bench_TEST_part_*.tsv)")
    samples: list[Sample] = []
    n_records, scorable = 0, split == "val"
    for path in paths:
        images = _store_images(path, store)
        for line, row in enumerate(_rows(path), start=1):
            n_records += 1
            rid = row.get("index", str(line))
            where = f"{path}, record {line} (index {rid!r})"
            try:
                samples.append(_sample(row, images, where, scorable))
            except DataError as err:
                bad.handle(err, rid)
    definition = "all VAL rows (multiple choice, options A-E)" if scorable else "TEST rows: no answers (unscorable)"
    return Benchmark("gmai-mmbench", ", ".join(map(str, paths)), definition, samples, n_records, {}, bad.skipped,
                     scorable=scorable)


def _image(row: dict, images: dict[str, str], where: str) -> str:
    cell = require(row, "image", where, str).strip()
    key = cell if len(cell) <= 64 else row.get("index", "")  # a short cell refers to another row's image
    if key not in images:
        raise DataError(f"{where}: field 'image' refers to row index {cell!r}, which has no image")
    if not images[key]:
        raise DataError(f"{where}: field 'image' is not valid base64" if len(cell) > 64 else
                        f"{where}: field 'image' refers to row index {cell!r}, whose image is not valid base64")
    return images[key]


def _sample(row: dict, images: dict[str, str], where: str, scorable: bool) -> Sample:
    question = require(row, "question", where, str)
    options = {k: row[k.lower()].strip() for k in "ABCDE"
               if row.get(k.lower(), "").strip() and row[k.lower()].strip().lower() != "nan"}
    if len(options) < 2:
        raise DataError(f"{where}: fewer than two option columns (A-E) are filled")
    image = _image(row, images, where)
    groups = {c: row[c] for c in GROUP_COLUMNS if row.get(c)}
    extra = {"question_type": row.get("clinical vqa task", ""), "modality": row.get("modality", ""),
             "groups": groups}
    sample_id = f"gmai-{require(row, 'index', where, str)}"
    if not scorable:
        return Sample(sample_id, [image], question, "", "multiple_choice", options=options,
                      prompt=prompt_for(row, options), **extra)
    answer = require(row, "answer", where, str).strip().upper()
    return mcq_sample(sample_id, [image], question, options, answer, where, prompt=prompt_for(row, options), **extra)
