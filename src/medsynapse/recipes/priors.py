"""Prior tokens for a training set, shared by every recipe that needs them (Stages I-III, `cache-features`).

Each distinct image is encoded once by the frozen prior encoder, or read from the on-disk feature cache
(`model.encoders.cache`), and every sample points at its image's row of the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch

from medsynapse.data.dataset import VQADataset
from medsynapse.model.counterfactual import reference_bank
from medsynapse.model.encoders import PriorOutput
from medsynapse.model.encoders.cache import PriorCache, image_key

if TYPE_CHECKING:
    from medsynapse.model.vlm import PromptBuilder

logger = logging.getLogger(__name__)


def prior_table(encode: Callable[[list], PriorOutput], encoder_path: str | None, dataset: VQADataset,
                batch_size: int = 64, cache_dir: str = "") -> tuple[PriorOutput, list[list[int]]]:
    """Prior tokens for every distinct image of every sample, computed once (or read from the on-disk cache);
    returns the table and each sample's rows in it, one per image in the sample's order. Images missing from the
    cache are encoded and added to it."""
    rows: dict[str, int] = {}  # image path -> row in the table
    first_sample: dict[str, tuple[int, int]] = {}  # image path -> (a sample that shows it, its place there)
    for index, sample in enumerate(dataset.samples):
        for place, path in enumerate(sample.images):
            first_sample.setdefault(path, (index, place))
            rows.setdefault(path, len(rows))
    order = [[rows[path] for path in sample.images] for sample in dataset.samples]
    paths = list(rows)

    def image_at(sample_index: int, place: int):
        return dataset.images(sample_index)[place]

    cache = PriorCache(cache_dir, encoder_path) if cache_dir and encoder_path else None
    keys = [image_key(p) for p in paths] if cache is not None else paths
    missing = [i for i, key in enumerate(keys) if cache is None or key not in cache]
    computed: dict[int, tuple] = {}
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        prior = encode([image_at(*first_sample[paths[i]]) for i in chunk])
        if cache is not None:
            cache.put([keys[i] for i in chunk], prior)
        for j, i in enumerate(chunk):
            finding = prior.finding[j].cpu() if prior.finding is not None else None
            computed[i] = (prior.tokens[j].cpu(), prior.region_mask[j].cpu(), prior.grid, finding)
    # (a row not computed here is in the cache)
    parts = [computed[i] if i in computed else cast(PriorCache, cache).get(keys[i]) for i in range(len(paths))]
    grids = {grid for _, _, grid, _ in parts}
    if len(grids) != 1:
        raise ValueError(f"images give different prior grids {sorted(grids)}: resize them to one size first")
    findings = [f for _, _, _, f in parts]
    finding = torch.stack(findings) if all(f is not None for f in findings) else None
    table = PriorOutput(torch.stack([t for t, _, _, _ in parts]), grids.pop(), torch.stack([r for _, r, _, _ in parts]),
                        finding)
    return table, order


def select_priors(table: PriorOutput, rows: list[list[int]], indices: list[int]
                  ) -> tuple[PriorOutput, list[int] | None]:
    """The prior rows of the samples `indices` (every image of each, in order) and their image counts for
    `images_per_sample`; None when each has one image (the single-image computation, unchanged)."""
    counts = [len(rows[i]) for i in indices]
    return table.select([row for i in indices for row in rows[i]]), (None if set(counts) == {1} else counts)


def cache_features(encoder_folder: str, data_file: str, cache_dir: str) -> int:
    """Fill the on-disk prior cache for every image of a data file; returns how many images the file has."""
    from medsynapse.data.schema import read_samples
    from medsynapse.model.encoders import load_encoder

    encoder = load_encoder(encoder_folder)
    dataset = VQADataset(read_samples(data_file), prompts=cast("PromptBuilder", None))  # only its images are read
    dataset.validate()
    table, _ = prior_table(encoder.encode, encoder_folder, dataset, cache_dir=cache_dir)
    return table.tokens.shape[0]


def attach_reference_bank(model, table: PriorOutput, size: int, required: bool) -> None:
    """Give `model` the `reference` counterfactual's bank, built from a training prior table (saved with the model).

    When the table cannot give one (no finding flags, no image without a finding): an error if `required` (the run
    uses the `reference` intervention), else a warning and the model keeps the bank it had.
    """
    try:
        model.reference_bank = reference_bank(table.tokens, table.finding, size)
    except ValueError as err:
        if required:
            raise
        logger.warning("no reference bank for the 'reference' counterfactual: %s", err)
