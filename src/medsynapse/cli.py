"""Command line: `medsynapse demo | train | predict | export | eval | eval-summary | fixtures | convert | pipeline |
study | inspect | ...`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*fast processor.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft, not ours


def cmd_demo(args: argparse.Namespace) -> int:
    from medsynapse.config import ConfigError
    from medsynapse.demo import run_demo
    from medsynapse.eval.report import efficiency_table, stage_table
    from medsynapse.runconfig import SECTIONS, read_run_config

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: config file not found (run from the repository root, or pass --config "
                          "with a copy of configs/synthmed.yaml)")
    overrides = [f"output={args.output}"] if args.output else []
    if args.cache_dir:
        overrides.append(f"synthmed.cache_dir={args.cache_dir}")
    if args.seeds:
        overrides.append(f"synthmed.seeds=[{args.seeds}]")
    if args.ablations:
        overrides.append("synthmed.ablations=true")
    for item in args.set or []:  # a key outside the run file's sections is a SynthMed setting (train_images=12)
        overrides.append(item if item.split(".", 1)[0].split("=", 1)[0] in SECTIONS else f"synthmed.{item}")
    run = read_run_config(args.config, overrides)
    results = run_demo(run)
    args.output = run.output
    if "seeds" in results:
        print(f"\nseeds {results['seeds']}: {args.output}/summary.json, summary.md, accuracy.png (per seed: seed_K/)")
        return 0
    print()
    print(stage_table(results))
    print()
    print(efficiency_table(results))
    print(f"\nwall time {results['timing_s']['total']:.1f} s; results in {args.output}/results.json, report.md, "
          "accuracy.png")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`train STAGE` or `train baseline --method M` (`train sft` is `train baseline --method sft`): the recipe the
    registry names, configured from a run file (its section resolved over the model and data sections, every value
    checked first) or from a flat recipe file (with the method's own settings forced)."""
    from medsynapse.config import load_config
    from medsynapse.recipes.registry import BASELINES, RECIPES
    from medsynapse.runconfig import read_run_config, resolve, resolve_baseline

    if args.stage == "baseline" and args.method not in BASELINES:
        raise SystemExit(f"train baseline: --method must be one of {', '.join(BASELINES)}")
    if args.stage != "baseline" and args.method:
        raise SystemExit("--method goes with `train baseline`")
    name = args.method if args.stage == "baseline" else args.stage
    recipe = RECIPES[name]
    if _is_run_file(args.config):
        from medsynapse.values import check_run

        run = read_run_config(args.config, args.set)
        check_run(run, memory_for={name})  # every stage's and baseline's values, before anything is loaded
        config = resolve(run, name) if recipe.kind == "stage" else resolve_baseline(run, name)
    else:  # a flat recipe file
        config = load_config(recipe.config_class(), args.config, [*(args.set or []), *recipe.forced])
        for key, value in recipe.unless_set:
            if not getattr(config, key):
                setattr(config, key, value)
        _check_flat(name, config, args.config)
    if args.resume:
        config.resume = True
    out = recipe.train()(config)
    print(f"baseline {name} saved to {out}" if recipe.kind == "baseline" else f"{name} saved to {out}")
    return 0


def _check_flat(kind: str, config, path: str) -> None:
    """A stage-only (flat recipe) file's values and memory bound (values.py), naming `FILE.key`."""
    from medsynapse.values import check_config, check_memory, folder_memory_slots, vlm_shape

    check_config(config, path)
    folder = getattr(config, "vlm", "") or getattr(config, "model", "")
    n_memory = getattr(config, "n_memory", 0) or folder_memory_slots(folder)
    check_memory(kind, config, path, vlm_shape(folder), n_memory=n_memory)


def _is_run_file(path: str) -> bool:
    from medsynapse.config import read_yaml
    from medsynapse.runconfig import is_run_config

    return Path(path).is_file() and is_run_config(read_yaml(Path(path)))


def cmd_config_show(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from medsynapse.runconfig import read_run_config, show

    run = read_run_config(args.file, args.set)
    resolved = show(run)
    if run.synthmed:  # the demo's SynthMed settings, its defaults included
        from medsynapse.demo import demo_settings

        resolved["synthmed"] = asdict(demo_settings(run))
    print(json.dumps(resolved, indent=2))
    return 0


def _need_app_extras(command: str, modules: tuple[str, ...]) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise NotImplementedError(f"`medsynapse {command}` needs {', '.join(missing)}: pip install -e '.[app]'")


def base_folders(args: argparse.Namespace):
    """`--vlm DIR` / `--encoder DIR`: the model folder's bases given explicitly (model/bases.py)."""
    from medsynapse.model.bases import BaseFolders

    return BaseFolders(vlm=args.vlm, encoder=args.encoder)


def add_base_options(parser: argparse.ArgumentParser) -> None:
    """--vlm / --encoder on a command that loads a saved model folder."""
    parser.add_argument("--vlm", default=None, metavar="DIR",
                        help="the model folder's base VLM, when it is not found by itself (searched: "
                             "$MEDSYNAPSE_CACHE/NAME, NAME next to the model folder, the path recorded relative to "
                             "it); must hold the content recorded in medsynapse.json")
    parser.add_argument("--encoder", default=None, metavar="DIR",
                        help="the model folder's prior encoder, likewise (a student folder has none)")


def cmd_serve(args: argparse.Namespace) -> int:
    _need_app_extras("serve", ("fastapi", "uvicorn"))
    from medsynapse.serve import ServeSettings, serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"medsynapse serve: listening on {args.host}: reachable from other machines; there is no "
              "authentication, put it behind one", file=sys.stderr)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels,
                             max_body_bytes=args.max_body_mb * 2**20, timeout_s=args.timeout,
                             allow_dirs=args.allow_dir or [], max_batch_tokens=args.max_batch_tokens,
                             max_decoded_bytes=args.max_decoded_mb * 2**20 if args.max_decoded_mb else None)
    serve(args.model, args.host, args.port, settings, bases=base_folders(args))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    _need_app_extras("app", ("gradio",))
    from medsynapse.app import AppLimits, launch

    limits = AppLimits(max_pixels=args.max_pixels, max_file_bytes=args.max_file_mb * 2**20, timeout_s=args.timeout,
                       max_decoded_bytes=args.max_decoded_mb * 2**20 if args.max_decoded_mb else None)
    launch(args.model, args.compare, args.host, args.port, args.max_new_tokens, bases=base_folders(args),
           limits=limits)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import json

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
    result = run_study(study, raw, source)
    print(f"\nstudy: {len(result['rows'])} rows x {len(result['seeds'])} seeds in {result['timing_s']['wall']:.0f} s; "
          f"{study.output}/study.json, table.md, table.csv, accuracy.png, efficiency.png")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from medsynapse.pipeline import run_pipeline
    from medsynapse.runconfig import read_run_config

    run = read_run_config(args.config, args.set)
    if run.synthmed:  # configs/synthmed.yaml: the same stages, with the demo's SynthMed steps around them
        if args.start or args.until:
            raise ValueError(f"{args.config}: a SynthMed run (with a `synthmed` section) runs whole, as `medsynapse "
                             "demo --config` does; --from/--until apply to a run file without it")
        from medsynapse.demo import run_demo

        run_demo(run)
        print(f"pipeline: SynthMed demo finished; results in {run.output}")
        return 0
    manifest = run_pipeline(run, start=args.start, until=args.until)
    print(f"pipeline: {', '.join(manifest['steps'])} finished; manifest in {manifest['config']}'s output folder")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medsynapse.data.images import load_image
    from medsynapse.model.medsynapse import MedSynapseV

    window = tuple(args.window) if args.window else None
    image = load_image(args.image, window=window, view=volume_view(args))  # a bad image, view or window fails
    # before the model is loaded
    from medsynapse.objectives.answers import format_prompt

    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True, bases=base_folders(args))
    question = format_prompt(args.question, model.answer_format)  # as the model was trained to be asked
    print(model.answer([image], [question], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medsynapse.model.export import export_student

    out = export_student(args.model, args.output, bases=base_folders(args), license_id=args.license,
                         datasets=args.dataset or None)
    print(f"exported to {out}: loads with `medsynapse predict | serve | eval | app --model {out}`, or with "
          "transformers' AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True) (see its README.md)")
    return 0


def volume_view(args: argparse.Namespace):
    """`--slice / --axis / --mip` as a NIfTI view (None when none is given); refused for a 2-D image."""
    from medsynapse.data.images import VolumeView, is_nifti

    if args.slice is None and args.mip is None and args.axis is None:
        return None
    if not is_nifti(args.image):
        raise ValueError(f"{args.image}: --slice, --axis and --mip choose an image of a NIfTI volume (.nii, .nii.gz)")
    if args.slice is not None and args.mip is not None:
        raise ValueError("--slice and --mip: give one (a slice, or the maximum-intensity projection over a range)")
    return VolumeView(axis=args.axis or "axial", slice=args.slice, mip=tuple(args.mip) if args.mip else None)


def parse_source_options(items: list[str], names: list[str]) -> dict[str, dict]:
    """`BENCHMARK.KEY=VALUE` loader options (values parsed as YAML scalars/lists), e.g. pmc-vqa.file=test.csv."""
    import yaml

    options: dict[str, dict] = {}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or name not in names:
            raise SystemExit(f"--option {item!r}: expected BENCHMARK.KEY=VALUE with BENCHMARK one of {names}")
        options.setdefault(name, {})[key] = yaml.safe_load(value)
    return options


def add_source_paths(options: dict[str, dict], items: list[str], names: list[str]) -> dict[str, dict]:
    """`--path BENCHMARK=DIR`: read BENCHMARK from DIR (any folder) instead of its folder under --data-root."""
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or name not in names or not folder:
            raise SystemExit(f"--path {item!r}: expected BENCHMARK=DIR with BENCHMARK one of {names}")
        options.setdefault(name, {})["folder"] = folder
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks

    settings = EvalSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, branch=args.branch,
                            skip_bad=args.skip_bad, limit=args.limit, max_pixels=args.max_pixels,
                            answer_format=args.answer_format)
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


def cmd_fixtures(args: argparse.Namespace) -> int:
    from medsynapse.data.sources.fixtures import write_fixtures

    print(f"fixture layouts of every supported dataset written under {write_fixtures(args.out)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from medsynapse.data.schema import write_samples
    from medsynapse.data.sources import load_source

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = parse_source_options([f"{args.source}.{o}" for o in args.option or []], [args.source])
    if args.path:
        options = add_source_paths(options, [f"{args.source}={args.path}"], [args.source])
    bench = load_source(args.source, args.data_root, out.parent / "images", skip_bad=args.skip_bad,
                        **options.get(args.source, {}))
    write_samples(out, bench.samples)
    print(f"{len(bench.samples)} samples from {bench.source} ({bench.closed_definition}) written to {out}; "
          f"excluded {bench.excluded}; skipped {len(bench.skipped)} bad records")
    for item in bench.skipped:
        print(f"  skipped {item['id']}: {item['error']}")
    return 0


def cmd_cache_features(args: argparse.Namespace) -> int:
    from medsynapse.recipes.priors import cache_features

    count = cache_features(args.encoder, args.data, args.out)
    print(f"prior features for {count} images cached under {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from medsynapse.config import load_config
    from medsynapse.recipes.inspect import RealSizeConfig, from_run, main

    if _is_run_file(args.config):
        from medsynapse.runconfig import read_run_config

        config = from_run(read_run_config(args.config, args.set))
    else:
        config = load_config(RealSizeConfig, args.config, args.set)
    print(main(config, as_json=args.json))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynapse", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line naming what is wrong")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)  # every command takes --debug (parents=[common])

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
    train.add_argument("--config", required=True)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys")
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser("predict", parents=[common],
                             help="answer one question about one image (PNG, JPEG, DICOM or a NIfTI volume's "
                                  "slice)")
    predict.add_argument("--model", required=True)
    predict.add_argument("--image", required=True)
    predict.add_argument("--question", required=True)
    predict.add_argument("--max-new-tokens", type=int, default=16)
    predict.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                         help="DICOM / NIfTI window (e.g. 40 400 for soft tissue); default: the file's own window "
                              "(NIfTI: its cal_min/cal_max, else the slice's range)")
    predict.add_argument("--slice", type=int, default=None,
                         help="NIfTI: the slice (voxel index along the file axis nearest the view's direction); "
                              "default the middle one")
    predict.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default=None,
                         help="NIfTI: the view (reoriented by the affine to the radiological convention); "
                              "default axial")
    predict.add_argument("--mip", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                         help="NIfTI: maximum-intensity projection over slices FIRST..LAST instead of one slice")
    add_base_options(predict)
    predict.set_defaults(func=cmd_predict)
    export = sub.add_parser("export", parents=[common],
                            help="an encoder-free student as one self-contained folder (LoRA merged, A_psi, "
                                 "processor, card), loadable by medsynapse and by transformers (trust_remote_code)")
    export.add_argument("--model", required=True, help="an encoder-free student (Stage III) folder")
    export.add_argument("--output", required=True, help="a new folder (or an empty one); written atomically")
    export.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0, Qwen3-VL's)")
    export.add_argument("--dataset", action="append", metavar="HUB_ID",
                        help="a training dataset for the card's `datasets` (repeatable; default: the data files the "
                             "student's training record names)")
    add_base_options(export)
    export.set_defaults(func=cmd_export)
    cache = sub.add_parser("cache-features", parents=[common],
                             help="precompute frozen prior-encoder features into safetensors shards")
    cache.add_argument("--encoder", required=True, help="prior-encoder folder")
    cache.add_argument("--data", required=True, help="a JSON-lines sample file")
    cache.add_argument("--out", required=True, help="cache root; recipes read it with prior_cache: DIR")
    cache.set_defaults(func=cmd_cache_features)

    from medsynapse.data.sources import SOURCES

    evaluate = sub.add_parser("eval", parents=[common],
                             help="evaluate a model on the public medical VQA benchmarks (resumable)")
    evaluate.add_argument("--model", required=True, help="a saved MedSynapse stage or a plain local Qwen3-VL folder")
    evaluate.add_argument("--benchmarks", required=True, help=f"comma-separated: {', '.join(SOURCES)}")
    evaluate.add_argument("--data-root", default=".", help="folder holding the datasets, each in a folder under our "
                          "name or the one it is published under (e.g. slake/ or Slake1.0/); default: here")
    evaluate.add_argument("--path", action="append", metavar="BENCHMARK=DIR",
                          help="read BENCHMARK from DIR instead, e.g. gmai-mmbench=~/LMUData, slake=/data/Slake1.0")
    evaluate.add_argument("--output", required=True)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="answer budget for every benchmark (default: each protocol's, 32 / MMMU 128 / HGV 64)")
    evaluate.add_argument("--option", action="append", metavar="BENCHMARK.KEY=VALUE",
                          help="loader option, e.g. pmc-vqa.file=test.csv, gmai-mmbench.split=test, "
                               "omnimedvqa.balance=true, vqa-rad.layout=hf")
    evaluate.add_argument("--branch", choices=["privileged", "counterfactual", "autonomous"], default=None)
    evaluate.add_argument("--skip-bad", action="store_true", help="skip bad records/images (counted and listed)")
    evaluate.add_argument("--limit", type=int, default=None, help="first N scored questions per benchmark")
    evaluate.add_argument("--max-pixels", type=int, default=None, help="cap the VLM's per-image pixel budget")
    evaluate.add_argument("--answer-format", choices=["direct", "reasoning"], default=None,
                          help="default: the format the model was trained with (recorded in its folder). "
                               "reasoning: the prompt asks for an analysis, then the final answer in "
                               "<answer></answer>, and only that tag is scored (give --max-new-tokens room)")
    add_base_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    summary = sub.add_parser("eval-summary", parents=[common],
                             help="one Table-1 style summary of several eval outputs")
    summary.add_argument("runs", nargs="+", metavar="[LABEL=]DIR")
    summary.add_argument("--output", required=True)
    summary.set_defaults(func=cmd_eval_summary)

    fixtures = sub.add_parser("fixtures", parents=[common],
                             help="write tiny copies of every supported dataset layout (for trying eval)")
    fixtures.add_argument("--out", required=True)
    fixtures.set_defaults(func=cmd_fixtures)

    convert = sub.add_parser("convert", parents=[common],
                             help="turn a training corpus (or any benchmark) into a MedSynapse JSONL file")
    convert.add_argument("--source", required=True, choices=list(SOURCES))
    convert.add_argument("--data-root", default=".")
    convert.add_argument("--path", default=None, metavar="DIR", help="read the source from DIR instead of its "
                         "folder under --data-root")
    convert.add_argument("--out", required=True, help="output .jsonl; embedded images go to its folder's images/")
    convert.add_argument("--skip-bad", action="store_true")
    convert.add_argument("--option", action="append", metavar="KEY=VALUE",
                         help="loader option, e.g. balance=true, per_modality=2000, "
                              "modalities=[Computed Tomography, Microscopy]")
    convert.set_defaults(func=cmd_convert)

    pipeline = sub.add_parser("pipeline", parents=[common],
                              help="convert -> cache -> Stage I -> II -> III -> eval -> summary from one run file, "
                                   "resumable")
    pipeline.add_argument("--config", required=True, help="a run file (configs/medsynapse-v-8b.yaml)")
    pipeline.add_argument("--from", dest="start", default=None, help="rerun from this step: convert, cache, stage1, "
                          "stage2, stage3 or eval (that step and every later one are redone)")
    pipeline.add_argument("--until", default=None, help="stop after this step")
    pipeline.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    pipeline.set_defaults(func=cmd_pipeline)

    server = sub.add_parser("serve", parents=[common],
                            help="an OpenAI-compatible chat-completions server with dynamic batching")
    server.add_argument("--model", required=True, help="a MedSynapse folder (Stage II with encoder, or a student)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--max-batch", type=int, default=16, help="requests answered together at most")
    server.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    server.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    server.add_argument("--max-new-tokens", type=int, default=64, help="default and largest max_tokens")
    server.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image (width x height)")
    server.add_argument("--max-body-mb", type=int, default=32, help="largest request body")
    server.add_argument("--timeout", type=float, default=120.0,
                        help="seconds from a request's arrival to its answer, decoding included (504)")
    server.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="a batch's padded size, rows x (longest prompt + max_tokens); prompts are batched by "
                             "length")
    server.add_argument("--max-decoded-mb", type=int, default=None,
                        help="largest inflated gzip'd NIfTI / Deflated DICOM and decoded DICOM pixel data (413); "
                             "default 32 bytes per --max-pixels pixel")
    server.add_argument("--allow-dir", action="append", metavar="DIR",
                        help="local image paths are read under this folder (repeatable; default none)")
    add_base_options(server)
    server.set_defaults(func=cmd_serve)

    app = sub.add_parser("app", parents=[common], help="a browser app: upload a scan, ask, see what the memory used")
    app.add_argument("--model", required=True, help="a MedSynapse folder")
    app.add_argument("--compare", default=None, help="a second folder shown side by side (e.g. the student)")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--max-new-tokens", type=int, default=16)
    app.add_argument("--max-pixels", type=int, default=4096 * 4096,
                     help="largest image (width x height), from the header before decoding (as serve)")
    app.add_argument("--max-decoded-mb", type=int, default=None,
                     help="largest inflated gzip'd NIfTI / Deflated DICOM and decoded DICOM pixel data; default 32 "
                          "bytes per --max-pixels pixel (as serve)")
    app.add_argument("--max-file-mb", type=int, default=32, help="largest upload on disk (as serve's --max-body-mb)")
    app.add_argument("--timeout", type=float, default=120.0, help="seconds to check and decode an upload")
    add_base_options(app)
    app.set_defaults(func=cmd_app)

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
    study.set_defaults(func=cmd_study)

    config = sub.add_parser("config", parents=[common], help="show a run config's fully resolved settings")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_show = config_sub.add_parser("show", parents=[common],
                                        help="every stage's settings as the recipes will run them, as JSON")
    config_show.add_argument("file")
    config_show.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="e.g. stage2.lr=1e-5 model.lora_r=8")
    config_show.set_defaults(func=cmd_config_show)

    inspect = sub.add_parser("inspect", parents=[common],
                             help="parameter counts and training memory of a real-size config (meta device)")
    inspect.add_argument("--config", required=True)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    inspect.set_defaults(func=cmd_inspect)

    diag = sub.add_parser("diagnose", parents=[common],
                             help="memory-reliance report: accuracy with the memory zeroed / mean / shuffled "
                                           "/ counterfactual / noise, collapse, leak and readability probes")
    diag.add_argument("--model", required=True, help="a saved MedSynapse stage folder")
    diag.add_argument("--data", required=True, help="a JSON-lines sample file (SynthMed test split for the probes)")
    diag.add_argument("--train-data", default=None, help="train sample file for the linear probes (none: probes "
                                                         "skipped, and the report says so)")
    diag.add_argument("--output", default="runs/diagnose", help="writes diagnostics.json and diagnostics.md here")
    diag.add_argument("--batch-size", type=int, default=16)
    diag.add_argument("--families", default=None, help="comma-separated question families to score, e.g. lesion")
    diag.add_argument("--intervention", default="zero",
                      help="counterfactual intervention for M' (zero, the paper's and the default; "
                           "drop; inpaint; pixels; reference: the nearest training image without a finding, for "
                           "folders trained by this version)")
    diag.add_argument("--seed", type=int, default=0, help="seed of the shuffle derangement, the noise and the probes")
    diag.add_argument("--max-new-tokens", type=int, default=8)
    add_base_options(diag)
    diag.set_defaults(func=cmd_diagnose)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a busy folder, not a bug: shown as one line (the message names the file,
    record and field); anything else keeps its traceback."""
    from medsynapse.config import ConfigError
    from medsynapse.data.schema import DataError
    from medsynapse.locking import FolderInUseError
    from medsynapse.model.processor import ModelNotFoundError

    return (ConfigError, DataError, FolderInUseError, ModelNotFoundError, FileNotFoundError, ValueError,
            NotImplementedError)  # a launch or setting this version refuses, with its reason


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    resolve_config_arguments(args)
    try:
        return args.func(args)
    except expected_errors() as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"medsynapse {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk, a read-only or forbidden folder: one line naming it, exit code 1
        message = _disk_message(err)
        if message is None or args.debug:
            raise
        print(f"medsynapse {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def resolve_config_arguments(args: argparse.Namespace) -> None:
    """Every command's config file (`--config`, `config show FILE`) found in the current folder or, failing that,
    among the configs shipped in the package (`config.find_config`): an installed wheel runs `medsynapse demo`
    without a checkout."""
    from medsynapse.config import find_config

    for name in ("config", "file"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, str(find_config(value)))


def _disk_message(err: BaseException) -> str | None:
    """The one line for an error that is the disk's or a folder's (locking.OutputNotWritable, or an OSError such as
    ENOSPC / EROFS / EACCES raised where no writer wrapped it: it names the path it carries); None otherwise."""
    from medsynapse.locking import DISK_ERRORS, OutputNotWritable

    if isinstance(err, OutputNotWritable):
        return " ".join(str(err).split())
    if not isinstance(err, OSError) or err.errno not in DISK_ERRORS:
        return None
    where = err.filename if err.filename is not None else "an output folder"
    hint = "; free some space and rerun (training: with --resume)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{where}: {DISK_ERRORS[err.errno]} ({os.strerror(err.errno)}){hint}"


def _end_process_group() -> None:
    """Destroy the torchrun process group once the command is done (recipes keep it for the next pipeline step)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # free the recipes' DDP modules first: one freed after its group is gone can block its rank
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
