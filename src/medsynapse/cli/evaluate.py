"""`eval`, `eval-summary` and `diagnose`: scoring saved models on benchmarks and probing their memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsynapse.cli.common import add_base_options, add_source_paths, base_folders, parse_source_options


def cmd_eval(args: argparse.Namespace) -> int:
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks

    settings = EvalSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, branch=args.branch,
                            skip_bad=args.skip_bad, limit=args.limit, max_pixels=args.max_pixels,
                            answer_format=args.answer_format, engine=args.engine)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    settings.source_options = add_source_paths(parse_source_options(args.option or [], names), args.path or [], names)
    results = evaluate_benchmarks(args.model, names, args.data_root, args.output, settings, bases=base_folders(args))
    print((Path(args.output) / "summary.md").read_text())
    skipped = sum(m["n_skipped"] for m in results.values())
    if skipped:
        print(f"{skipped} bad records skipped (listed in each metrics.json)")
    return 0


def cmd_eval_summary(args: argparse.Namespace) -> int:
    from medsynapse.eval.summary import write_summary

    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        runs[label or Path(folder).name] = folder
    Path(args.output).mkdir(parents=True, exist_ok=True)
    print(write_summary(args.output, runs=runs))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from medsynapse.eval.diagnostics import diagnose

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    result = diagnose(args.model, args.data, args.train_data, args.output, batch_size=args.batch_size,
                      families=families, intervention=args.intervention, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, bases=base_folders(args))
    print((Path(args.output) / "diagnostics.md").read_text())
    if result["n_skipped"]:
        print(f"{result['n_skipped']} item(s) skipped (listed in diagnostics.json)")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from medsynapse.data.sources import SOURCES

    evaluate = sub.add_parser("eval", parents=[common],
                             help="evaluate a model on the public medical VQA benchmarks (resumable)")
    evaluate.add_argument("--model", required=True, help="a saved MedSynapse stage or a plain local Qwen3-VL folder")
    evaluate.add_argument("--benchmarks", required=True, help=f"comma-separated: {', '.join(SOURCES)}")
    evaluate.add_argument("--data-root", default=".", help="folder holding the datasets, each in a folder under our "
                          "name or the one it is published under (e.g. slake/ or Slake1.0/); default: here")
    evaluate.add_argument("--path", action="append", metavar="BENCHMARK=DIR",
                          help="read BENCHMARK from DIR instead, e.g. gmai-mmbench=~/LMUData, slake=/data/Slake1.0")
    evaluate.add_argument("--output", required=True, help="writes results.json, results.md and predictions here")
    evaluate.add_argument("--batch-size", type=int, default=8, help="questions generated at once")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="answer budget for every benchmark (default: each protocol's, 32 / MMMU 128 / HGV 64)")
    evaluate.add_argument("--option", action="append", metavar="BENCHMARK.KEY=VALUE",
                          help="loader option, e.g. pmc-vqa.file=test.csv, gmai-mmbench.split=test, "
                               "omnimedvqa.balance=true, vqa-rad.layout=hf")
    evaluate.add_argument("--branch", choices=["privileged", "counterfactual", "autonomous"], default=None,
                          help="which memory answers (default: the model's own: A_psi for a student, else P_phi)")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip bad records/images (counted and listed)")
    evaluate.add_argument("--limit", type=int, default=None, help="first N scored questions per benchmark")
    evaluate.add_argument("--max-pixels", type=int, default=None, help="cap the VLM's per-image pixel budget")
    evaluate.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                          help="generate with transformers (default) or vLLM (the .venv-vllm environment, one "
                               "process; the same answers: docs/vllm.md)")
    evaluate.add_argument("--answer-format", choices=["direct", "reasoning"], default=None,
                          help="default: the format the model was trained with (recorded in its folder). "
                               "reasoning: the prompt asks for an analysis, then the final answer in "
                               "<answer></answer>, and only that tag is scored (give --max-new-tokens room)")
    add_base_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    summary = sub.add_parser("eval-summary", parents=[common],
                             help="one Table-1 style summary of several eval outputs")
    summary.add_argument("runs", nargs="+", metavar="[LABEL=]DIR", help="eval output folders, one row each")
    summary.add_argument("--output", required=True, help="writes summary.json, summary.md and a plot here")
    summary.set_defaults(func=cmd_eval_summary)

    diag = sub.add_parser("diagnose", parents=[common],
                             help="memory-reliance report: accuracy with the memory zeroed / mean / shuffled "
                                           "/ counterfactual / noise, collapse, leak and readability probes")
    diag.add_argument("--model", required=True, help="a saved MedSynapse stage folder")
    diag.add_argument("--data", required=True, help="a JSON-lines sample file (SynthMed test split for the probes)")
    diag.add_argument("--train-data", default=None, help="train sample file for the linear probes (none: probes "
                                                         "skipped, and the report says so)")
    diag.add_argument("--output", default="runs/diagnose", help="writes diagnostics.json and diagnostics.md here")
    diag.add_argument("--batch-size", type=int, default=16, help="questions generated at once")
    diag.add_argument("--families", default=None, help="comma-separated question families to score, e.g. lesion")
    diag.add_argument("--intervention", default="zero",
                      help="counterfactual intervention for M' (zero, the paper's and the default; "
                           "drop; inpaint; pixels; reference: the nearest training image without a finding, for "
                           "folders trained by this version)")
    diag.add_argument("--seed", type=int, default=0, help="seed of the shuffle derangement, the noise and the probes")
    diag.add_argument("--max-new-tokens", type=int, default=8, help="longest answer generated")
    add_base_options(diag)
    diag.set_defaults(func=cmd_diagnose)
