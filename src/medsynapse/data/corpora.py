"""Training files from corpora by name: what `medsynapse pipeline`'s `convert` step writes.

Plan: each corpus is read with its benchmark loader (`load_source`, the published layout under the data root, or
its own folder), cut to a seeded random subset of `size` samples when asked (the paper's "50K PubMedVision pairs",
"3K OmniMedVQA + 1K SLAKE/PathVQA open"), then the corpora are concatenated in the order given and written atomically
as one training JSONL; images embedded in parquet/TSV files go to an `images/` folder beside it. Ids must be unique
across corpora (they key the prior-feature cache and the resumable steps); bad records stop the step with the file
and record named, or with `skip_bad` are skipped and counted in the report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from medsynapse.data.schema import Sample, write_samples
from medsynapse.data.sources import SOURCES, load_source


@dataclass
class CorpusSpec:
    name: str  # a `medsynapse convert --source` name, e.g. pubmedvision, omnimedvqa, slake-open-train
    size: int = 0  # a seeded random subset of this many samples (0 = every sample)
    path: str = ""  # read from this folder instead of DATA_ROOT/<the published folder name>
    options: dict = field(default_factory=dict)  # the loader's options, as `convert --option KEY=VALUE`


def check_specs(specs: list[CorpusSpec], where: str) -> None:
    for index, spec in enumerate(specs):
        if spec.name not in SOURCES:
            raise ValueError(f"{where}[{index}].name {spec.name!r}: unknown corpus; known: {', '.join(SOURCES)}")
        if spec.size < 0:
            raise ValueError(f"{where}[{index}].size must be >= 0, got {spec.size}")


def subset(samples: list[Sample], size: int, seed: int) -> list[Sample]:
    """`size` samples drawn without replacement by a seeded generator, in their original order (all if size is 0 or
    at least the corpus size)."""
    if size == 0 or size >= len(samples):
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), size))
    return [samples[i] for i in keep]


def write_training_file(specs: list[CorpusSpec], data_root: str | Path, out_file: str | Path, seed: int = 0,
                        skip_bad: bool = False) -> dict:
    """Convert `specs` into `out_file` (plan above); returns the report: per corpus the samples read, kept,
    excluded by the loader's rule and skipped as bad, and the total written."""
    check_specs(specs, "corpora")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    origin: dict[str, str] = {}
    report: dict = {"corpora": []}
    for spec in specs:
        options = {**spec.options, **({"folder": spec.path} if spec.path else {})}  # every loader's folder option
        bench = load_source(spec.name, Path(data_root).expanduser().resolve(), out_file.parent / "images",
                            skip_bad=skip_bad, **options)
        kept = subset(bench.samples, spec.size, seed)
        for sample in kept:
            if sample.id in origin:
                raise ValueError(f"{bench.source}: sample id {sample.id!r} (field 'id') is also in corpus "
                                 f"{origin[sample.id]!r}; ids must be unique across a training file's corpora")
            origin[sample.id] = spec.name
        samples += kept
        report["corpora"].append({"name": spec.name, "source": bench.source, "read": len(bench.samples),
                                  "kept": len(kept), "excluded": bench.excluded, "skipped": len(bench.skipped),
                                  "skipped_ids": [item["id"] for item in bench.skipped]})
        print(f"convert: {spec.name}: kept {len(kept)} of {len(bench.samples)} samples "
              f"(skipped {len(bench.skipped)} bad records) from {bench.source}", flush=True)
    if not samples:
        raise ValueError(f"{out_file}: the corpora {[s.name for s in specs]} gave no samples")
    write_samples(out_file, samples)
    report["written"] = len(samples)
    return report
