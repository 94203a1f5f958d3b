"""Cost of the causal counterfactual reward in a Stage II step: λ_causal = 0.5 vs 0, same seeds, data and settings.

With λ_causal > 0 the scoring forward covers both memory conditions (2·B·G rows) instead of the factual one only;
everything else (generation, the policy update) is identical. Runs both configurations in one process, alternating
A, B, A, B so drifts of the machine hit both, and prints median step times and their ratio.
Usage: python benchmarks/stage2_causal_cost.py --stage1 runs/demo/stage1 --train-file DATA/train.jsonl [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage1", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from transformers.utils import logging

    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    times: dict[float, list[float]] = {0.5: [], 0.0: []}
    for _ in range(args.rounds):
        for lam in (0.5, 0.0):
            out = Path(tempfile.mkdtemp())
            config = Stage2Config(model=args.stage1, train_file=args.train_file, output_dir=str(out), lora_r=16,
                                  lora_alpha=32, batch_size=args.batch_size, group_size=4, max_steps=args.steps,
                                  lr=3e-4, temperature=1.0, top_p=1.0, max_new_tokens=6, lambda_causal=lam,
                                  families=["lesion"], save_every=10_000, log_every=10_000)
            train_stage2(config)
            summary = json.loads((out / "causal_reward_summary.json").read_text())
            times[lam].extend(summary["step_seconds_this_run"][2:])  # first steps warm up caches
    with_causal, plain = statistics.median(times[0.5]), statistics.median(times[0.0])
    print(f"B = {args.batch_size} prompts x G = 4, {len(times[0.5])} timed steps each")
    print("| setting | median step s |\n|---|---|")
    print(f"| λ_causal = 0.5 (factual + counterfactual scoring) | {with_causal:.3f} |")
    print(f"| λ_causal = 0 (factual scoring only) | {plain:.3f} |")
    print(f"ratio: {with_causal / plain:.2f}x")


if __name__ == "__main__":
    main()
