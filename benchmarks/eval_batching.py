"""Evaluation throughput: batched, left-padded generation vs batch size 1 on the same questions, side by side.

Runs the `medsynapse eval` generation path (BenchmarkRun) over the first N questions of a JSON-lines sample file at
each batch size, in alternating order (1, B, 1, B, ...) so drift hits both, and keeps each setting's best run.
Also reports how many raw outputs are identical to batch size 1 (left padding should not change greedy answers).
Usage: python benchmarks/eval_batching.py --model runs/demo/stage2 --data ~/.cache/medsynapse/data-*/test.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging

    from medsynapse.data.schema import read_samples
    from medsynapse.data.sources import Benchmark
    from medsynapse.eval.runner import PREDICTIONS, BenchmarkRun, EvalSettings, read_predictions
    from medsynapse.model.medsynapse import MedSynapseV

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True)
    samples = read_samples(args.data)[: args.n]
    bench = Benchmark("synthmed", args.data, "first N held-out questions", samples, len(samples))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    best: dict[int, float] = {}
    outputs: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for size in sizes:
            out = Path(tempfile.mkdtemp())
            settings = EvalSettings(batch_size=size, max_new_tokens=args.max_new_tokens)
            start = time.perf_counter()
            BenchmarkRun(model, bench, out, settings, args.model).run()
            wall = time.perf_counter() - start
            best[size] = min(best.get(size, float("inf")), wall)
            outputs[size] = [p["raw"] for p in read_predictions(out / PREDICTIONS)]
    print(f"{len(samples)} questions, max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print("| batch size | wall s | ms / question | speed-up vs 1 | outputs identical to bs 1 |")
    print("|---|---|---|---|---|")
    for size in sizes:
        same = sum(a == b for a, b in zip(outputs[size], outputs[sizes[0]]))
        print(f"| {size} | {best[size]:.2f} | {1000 * best[size] / len(samples):.1f} | "
              f"{best[sizes[0]] / best[size]:.2f}x | {same}/{len(samples)} |")


if __name__ == "__main__":
    main()
