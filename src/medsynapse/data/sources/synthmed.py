"""SynthMed's held-out split as a benchmark: `medsynapse eval --benchmarks synthmed --path synthmed=DATA` scores any
model folder on the questions the demo reports (the lesion family, captions excluded), so every baseline trained
outside the demo is scored by the same harness. DATA is a folder `generate_split` wrote (the demo's cache
`data-KEY/`, named in `runs/demo/run.yaml`); without `--path`, DATA_ROOT/synthmed/ or DATA_ROOT itself."""

from __future__ import annotations

from pathlib import Path

from medsynapse.data.schema import DataError, read_samples
from medsynapse.data.sources.common import BadRecords, Benchmark, source_folder

FOLDERS = ("synthmed",)


def load(data_root: Path, store, bad: BadRecords, split: str = "test", families: tuple[str, ...] = ("lesion",),
         folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    if not (root / f"{split}.jsonl").is_file() and (data_root / f"{split}.jsonl").is_file() and not folder:
        root = data_root
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: SynthMed split not found (a folder written by medsynapse's generate_split, e.g. the "
                        "demo's cached data-KEY/)")
    samples = read_samples(path)
    families = (families,) if isinstance(families, str) else tuple(families)
    excluded = {"caption": 0, f"family not in {list(families)}": 0}
    kept = []
    for sample in samples:
        if sample.answer_type == "caption":
            excluded["caption"] += 1
        elif families and sample.family not in families:
            excluded[f"family not in {list(families)}"] += 1
        else:
            kept.append(sample)
    return Benchmark("synthmed", str(path), f"SynthMed {split} split, families {list(families)}, captions excluded",
                     kept, len(samples), excluded, bad.skipped, max_new_tokens=8)
