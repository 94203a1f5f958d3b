"""The baseline rows on SynthMed over training seeds: each baseline trained from the demo's run file with its own
command's code path (`resolve_baseline` + the recipe) and scored by the benchmark harness (`medsynapse eval`'s
`evaluate_benchmarks` on the `synthmed` source: the demo's 765 held-out lesion questions).

Plan: the demo's shared steps (data, base VLM, prior encoder: cached, built if missing) from configs/synthmed.yaml;
per seed, every method into OUTPUT/seed_K/<method folder> (a finished folder is kept: rerun to resume), then its
evaluation (resumable); finally OUTPUT/summary.json and summary.md with mean ± sd [95 % t-interval] per method and
per question type. Reasoning-format models (CoT-SFT, Coconut, IVT-LR) get `--reasoning-tokens` new tokens, the
others the benchmark's 8.
Usage: python scripts/synthmed_baselines.py [--methods cot-sft coconut mcout ivt-lr] [--seeds 0,1,2]
       [--output runs/baselines]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsynapse.eval.report import aggregate, write_json
from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks
from medsynapse.locking import write_text_atomic
from medsynapse.runconfig import BASELINES, baseline_recipe, read_run_config, resolve_baseline
from medsynapse.steps.synthmed import demo_settings, prepare_shared, seed_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthmed.yaml")
    parser.add_argument("--methods", nargs="+", default=["cot-sft", "coconut", "mcout", "ivt-lr"],
                        choices=list(BASELINES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default="runs/baselines")
    parser.add_argument("--reasoning-tokens", type=int, default=48)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run = read_run_config(args.config, args.set)
    shared = prepare_shared(demo_settings(run))
    out = Path(args.output)
    rows: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in (int(s) for s in args.seeds.split(",")):
        seeded = seed_run(run, shared, seed, out / f"seed_{seed}")
        for method in args.methods:
            config = resolve_baseline(seeded, method)
            folder = Path(config.output_dir)
            if not (folder / "medsynapse.json").is_file():
                print(f"seed {seed}: training {method} into {folder}", flush=True)
                config.resume = True  # a killed run continues from its newest checkpoint
                baseline_recipe(method)(config)
            reasoning = method in ("cot-sft", "coconut", "ivt-lr")
            settings = EvalSettings(batch_size=64, max_new_tokens=args.reasoning_tokens if reasoning else None)
            metrics = evaluate_benchmarks(str(folder), ["synthmed"], str(shared.data), folder / "eval",
                                          settings)["synthmed"]
            rows[method].append({"accuracy": metrics["accuracy"], "unparseable": metrics.get("unparseable"),
                                 "by_question_type": metrics.get("by_question_type", {})})
            print(f"seed {seed}: {method} accuracy {metrics['accuracy']:.3f}", flush=True)
    summary = {"seeds": args.seeds, "methods": {m: {"per_seed": v, **aggregate(v)} for m, v in rows.items()}}
    write_json(out / "summary.json", summary)
    lines = ["| method | accuracy, mean ± sd [95 % t-interval] | per seed |", "|---|---|---|"]
    for method, row in summary["methods"].items():
        stat = row["accuracy"]
        interval = (f" [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]" if stat.get("ci95") else "")
        sd = f" ± {stat['sd']:.3f}" if stat.get("sd") is not None else ""
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in row["per_seed"])
        lines.append(f"| {method} | {stat['mean']:.3f}{sd}{interval} | {per_seed} |")
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({m: r["accuracy"] for m, r in summary["methods"].items()}))


if __name__ == "__main__":
    main()
