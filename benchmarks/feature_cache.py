"""Stage I epoch time with the on-disk prior-feature cache vs computing the priors in the run, side by side.

Runs: (1) Stage I for one epoch without a cache, (2) `cache-features` once, (3) Stage I for one epoch reading the
cache, with the same data and settings. The prior encoder runs once per distinct image per run in (1); in (3) the
features come from safetensors shards. Prints wall times and the ratio.
Usage: python benchmarks/feature_cache.py --vlm VLM --encoder ENC --train-file DATA/train.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vlm", required=True)
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--train-file", required=True)
    args = parser.parse_args()

    from transformers.utils import logging

    from medsynapse.data.dataset import training_dataset
    from medsynapse.recipes.priors import cache_features
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    types = ["yes_no", "multiple_choice", "open"]
    n = len(training_dataset(args.train_file, None, [], types, with_answers=True))
    steps = max(1, n // 32)  # one epoch at batch 32

    def run(cache: str) -> float:
        out = Path(tempfile.mkdtemp())
        start = time.perf_counter()
        train_stage1(Stage1Config(vlm=args.vlm, encoder=args.encoder, train_file=args.train_file, output_dir=str(out),
                                  n_memory=16, sampler_width=128, batch_size=32, max_steps=steps, lr=1e-3,
                                  answer_types=types, save_every=10_000, prior_cache=cache))
        return time.perf_counter() - start

    cache = tempfile.mkdtemp()
    start = time.perf_counter()
    cache_features(args.encoder, args.train_file, cache)
    fill = time.perf_counter() - start
    without = run("")
    with_cache = run(cache)
    print(f"one Stage I epoch: {n} samples, {steps} steps of 32")
    print("| run | wall s |\n|---|---|")
    print(f"| without cache (priors computed in the run) | {without:.1f} |\n| with cache | {with_cache:.1f} |")
    print(f"| (filling the cache once) | {fill:.1f} |")
    print(f"ratio with / without: {with_cache / without:.2f}")


if __name__ == "__main__":
    main()
