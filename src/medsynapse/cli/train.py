"""`demo`, `train`, `pipeline` and `study`: the commands that train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    """The rows of configs/study-demo.yaml over the run file, through the study (study.demo_study), then the
    demo's per-seed report (demo.write_reports)."""
    from medsynapse.runconfig import SECTIONS

    overrides = [f"output={args.output}"] if args.output else []
    if args.cache_dir:
        overrides.append(f"synthmed.cache_dir={args.cache_dir}")
    if args.seeds:
        overrides.append(f"synthmed.seeds=[{args.seeds}]")
    if args.ablations:
        overrides.append("synthmed.ablations=true")
    for item in args.set or []:  # a key outside the run file's sections is a SynthMed setting (train_images=12)
        overrides.append(item if item.split(".", 1)[0].split("=", 1)[0] in SECTIONS else f"synthmed.{item}")
    return run_demo(args.config, overrides)


def run_demo(config: str | Path, overrides: list[str]) -> int:
    """`medsynapse demo` (and `pipeline` on a SynthMed run file): the demo study, then its report; prints it."""
    import torch

    from medsynapse.demo import write_reports
    from medsynapse.eval.report import efficiency_table, stage_table
    from medsynapse.runconfig import run_config_from
    from medsynapse.steps.synthmed import demo_settings
    from medsynapse.study import demo_study, run_study

    study, raw, source = demo_study(config, overrides)
    run = run_config_from(raw, source)
    threads = demo_settings(run).threads
    if threads:
        torch.set_num_threads(threads)
    results = write_reports(run_study(study, raw, source), run)
    if len(study.seeds) > 1:
        print(f"\nseeds {study.seeds}: {run.output}/table.md, study.json (every row over seeds); summary.json, "
              "summary.md (diagnostics, claims, latency over seeds); per seed: seed_K/")
        return 0
    print()
    print(stage_table(results))
    print()
    print(efficiency_table(results))
    print(f"\nwall time {results['timing_s']['total']:.1f} s; results in {run.output}/results.json, report.md, "
          "table.md, accuracy.png")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`train STAGE` or `train baseline --method M` (`train sft` is `train baseline --method sft`): the recipe the
    registry names, configured from a run file (its section resolved over the model and data sections, every value
    checked first)."""
    from medsynapse.recipes.registry import BASELINES, RECIPES
    from medsynapse.runconfig import read_run_config, resolve, resolve_baseline
    from medsynapse.values import check_run

    if args.stage == "baseline" and args.method not in BASELINES:
        raise SystemExit(f"train baseline: --method must be one of {', '.join(BASELINES)}")
    if args.stage != "baseline" and args.method:
        raise SystemExit("--method goes with `train baseline`")
    name = args.method if args.stage == "baseline" else args.stage
    recipe = RECIPES[name]
    run = read_run_config(args.config, args.set)
    check_run(run, memory_for={name})  # every stage's and baseline's values, before anything is loaded
    config = resolve(run, name) if recipe.kind == "stage" else resolve_baseline(run, name)
    if args.resume:
        config.resume = True
    out = recipe.train()(config)
    print(f"baseline {name} saved to {out}" if recipe.kind == "baseline" else f"{name} saved to {out}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """A run file's steps as a one-seed study (study.pipeline_study, run_pipeline); a SynthMed run file: the demo."""
    from medsynapse.runconfig import read_run_config
    from medsynapse.study import pipeline_study, run_pipeline

    run = read_run_config(args.config, args.set)
    if run.synthmed:  # configs/synthmed.yaml: the same stages, with the demo's SynthMed steps around them
        if args.start or args.until:
            raise ValueError(f"{args.config}: a SynthMed run (with a `synthmed` section) runs whole, as `medsynapse "
                             "demo --config` does; --from/--until apply to a run file without it")
        run_demo(args.config, list(args.set or []))
        print(f"pipeline: SynthMed demo finished; results in {run.output}")
        return 0
    study, raw, source = pipeline_study(args.config, args.set)
    result = run_pipeline(study, raw, source, start=args.start, until=args.until)
    if "rows" in result:
        print("\n" + (Path(run.output) / "table.md").read_text())
        print(f"pipeline: {run.output}/table.md, study.json (every row scored on {', '.join(study.benchmarks)}); "
              f"each stage's model linked as {run.output}/stage1, stage2, stage3_student")
    elif "units" in result:
        print(f"pipeline: trained {', '.join(result['units'])} in {run.output}/units (linked as its stage folders)")
    elif "prepare" in result:
        print(f"pipeline: {', '.join(result['prepare'])} finished; record in {run.output}/prepare.json")
    return 0


def cmd_study(args: argparse.Namespace) -> int:

    from medsynapse.study import describe_plan, plan_markdown, read_study, run_study

    rows = args.rows.split(",") if args.rows else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    overrides = list(args.set or []) + ([f"output={args.output}"] if args.output else [])
    overrides += [f"workers={args.workers}"] if args.workers is not None else []
    study, raw, source = read_study(args.config, rows, seeds, overrides)
    if args.plan:  # nothing is built, trained or evaluated
        plan = describe_plan(study, raw, source)
        print(json.dumps(plan, indent=2) if args.json else plan_markdown(plan))
        return 0
    if args.prepare:  # step 1 only: the shared folders (and, asked for, each base VLM's token readability)
        from medsynapse.study import prepare

        print(json.dumps(prepare(study, raw, source)[2], indent=2))
        return 0
    result = run_study(study, raw, source)
    print(f"\nstudy: {len(result['rows'])} rows x {len(result['seeds'])} seeds in {result['timing_s']['wall']:.0f} s; "
          f"{study.output}/study.json, table.md, table.csv, accuracy.png, efficiency.png")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common],
                             help="run the whole pipeline on the embedded SynthMed task")
    demo.add_argument("--config", default="configs/synthmed.yaml",
                      help="the demo's run file (default configs/synthmed.yaml, relative to the current folder)")
    demo.add_argument("--output", default=None, help="default: the run file's `output` (runs/demo)")
    demo.add_argument("--cache-dir", default=None, help="where data and tiny models are cached")
    demo.add_argument("--seeds", default=None, help="comma-separated training seeds, e.g. 0,1,2: one run per seed "
                      "(data, base VLM and encoder shared) and a summary with mean ± sd and 95 %% intervals")
    demo.add_argument("--ablations", action="store_true",
                      help="also train the ablations: Stage II with lambda_causal 0, the paper's exact Eq. 5 and the "
                           "ranked reward; Stage III with the paper's JSD only")
    demo.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                      help="override run-file keys, e.g. stage1.max_steps=50; a key outside the run file's sections "
                           "is a SynthMed setting (train_images=200 = synthmed.train_images=200)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", parents=[common],
                             help="train one stage, or a no-memory baseline (baseline --method sft|cot-sft|grpo)")
    from medsynapse.recipes.registry import STAGES

    train.add_argument("stage", choices=[*STAGES, "sft", "baseline"], help="a stage, `sft` (= baseline --method sft) "
                       "or `baseline`")
    train.add_argument("--method", default=None, help="with `baseline`: sft, cot-sft (LoRA on the reasoning steps + "
                       "answer), grpo (GRPO-only, no memory), coconut (continuous thoughts, by curriculum) mcout "
                       "(MCOUT-Multi: thoughts through a latent attention over the image and text) or ivt-lr "
                       "(Coconut's curriculum + the most-attended image tokens inserted per latent step)")
    train.add_argument("--config", required=True, help="a run file (docs/configuration.md)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys")
    train.set_defaults(func=cmd_train)

    pipeline = sub.add_parser("pipeline", parents=[common],
                              help="convert -> cache -> Stage I -> II -> III -> eval from one run file: a "
                                   "one-seed study, resumable")
    pipeline.add_argument("--config", required=True, help="a run file (configs/medsynapse-v-8b.yaml)")
    pipeline.add_argument("--from", dest="start", default=None, help="rerun from this step: convert, cache, stage1, "
                          "stage2, stage3 or eval (that step and every later one are redone)")
    pipeline.add_argument("--until", default=None, help="stop after this step")
    pipeline.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="e.g. stage2.lr=1e-5 model.lora_r=8")
    pipeline.set_defaults(func=cmd_pipeline)

    study = sub.add_parser("study", parents=[common],
                           help="Table 1 and the ablations over seeds from a study file: shared units, resumable "
                                "per cell, study.json + table.md/csv + plots")
    study.add_argument("--config", default="configs/study-synthmed.yaml", help="a study file (rows of a run file)")
    study.add_argument("--rows", default=None, help="comma-separated rows of the study file (default: all)")
    study.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the file's)")
    study.add_argument("--workers", type=int, default=None, help="jobs at once (default: the file's)")
    study.add_argument("--output", default=None, help="default: the study file's `output`")
    study.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="study-file keys, e.g. latency_samples=0")
    study.add_argument("--plan", action="store_true",
                       help="print every row's units, reference, format and accelerator-hours; run nothing")
    study.add_argument("--json", action="store_true", help="with --plan: the plan as JSON")
    study.add_argument("--prepare", action="store_true",
                       help="build the shared folders only (SynthMed: data, base VLMs, encoder; with "
                            "`token_readability: true`, each base VLM's measured visibility) and print them as JSON")
    study.set_defaults(func=cmd_study)
