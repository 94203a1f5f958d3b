"""Loaders for the public medical VQA benchmarks and training corpora, by name.

`load_source(name, data_root, ...)` reads `data_root/<folder>` in the published layout (see each module's docstring
and docs/evaluation.md) and returns a `Benchmark`: the scored samples, the closed-ended definition used, and what was
excluded or skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from medsynapse.data.sources import (
    gmai,
    hgv_bundle,
    medxpertqa,
    mmmu,
    omnimedvqa,
    pathvqa,
    pmc_vqa,
    pubmedvision,
    slake,
    synthmed,
    vqa_rad,
)
from medsynapse.data.sources.common import BadRecords, Benchmark, ImageStore


@dataclass(frozen=True)
class Source:
    label: str  # the column name in the summary table
    loader: Callable[..., Benchmark]
    folders: str  # where under the data root it is read from (for help texts)
    options: dict = field(default_factory=dict)
    max_new_tokens: int = 32  # answer budget: closed answers are short; MMMU's official budget is 128


# The paper's Table 1 columns, in its order.
PAPER_BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "mmmu-med", "medxpertqa-mm", "gmai-mmbench")

SOURCES: dict[str, Source] = {
    "vqa-rad": Source("VQA-RAD", vqa_rad.load, "vqa_rad/ (OSF) or vqa_rad_hf/ (HF parquet)"),
    "slake": Source("SLAKE", slake.load, "slake/"),
    "pathvqa": Source("PathVQA", pathvqa.load, "path_vqa/ (HF parquet) or pvqa/ (original pickles)"),
    "pmc-vqa": Source("PMC-VQA", pmc_vqa.load, "pmc_vqa/"),
    "mmmu-med": Source("MMMU H&M", mmmu.load, "mmmu/<Subject>/", max_new_tokens=128),
    "medxpertqa-mm": Source("MedXpertQA-MM", medxpertqa.load, "medxpertqa/"),
    "gmai-mmbench": Source("GMAI-MMBench", gmai.load, "gmai/"),
    "hgv-bundle": Source("HGV closed MCQ", hgv_bundle.load, "medical_multimodal_eval/", max_new_tokens=64),
    "omnimedvqa": Source("OmniMedVQA", omnimedvqa.load, "omnimedvqa/"),
    "synthmed": Source("SynthMed", synthmed.load, "synthmed/ (or --path synthmed=DATA)", max_new_tokens=8),
    # training corpora
    "pubmedvision": Source("PubMedVision", pubmedvision.load, "pubmedvision/"),
    "slake-open-train": Source("SLAKE open train", slake.load, "slake/", {"split": "train", "answer_type": "OPEN"}),
    "pathvqa-open-train": Source("PathVQA open train", pathvqa.load, "path_vqa/ or pvqa/",
                                 {"split": "train", "open_only": True}),
}


def check_options(name: str, options: dict) -> None:
    """Loader options by name: an unknown one is an error listing the valid ones (not a raw TypeError)."""
    known = list(inspect.signature(SOURCES[name].loader).parameters)[3:]  # after (data_root, store, bad)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid: {', '.join(known) or 'none'}")


def load_source(name: str, data_root: str | Path, image_cache: str | Path, skip_bad: bool = False,
                **options) -> Benchmark:
    """Load one source. `image_cache` receives images embedded in parquet/TSV files (content-addressed)."""
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    check_options(name, options)
    loader = partial(source.loader, **{**source.options, **options})
    bad = BadRecords(skip_bad)
    benchmark = loader(Path(data_root).expanduser(), ImageStore(image_cache), bad)
    benchmark.drop_duplicate_ids(bad)
    benchmark.name = name
    benchmark.max_new_tokens = source.max_new_tokens
    return benchmark


__all__ = ["PAPER_BENCHMARKS", "SOURCES", "Benchmark", "BadRecords", "ImageStore", "check_options", "load_source"]
