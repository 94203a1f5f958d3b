"""The chain of steps of one run file, from its training files to a Table-1 summary, resumable: what `medsynapse
pipeline --config RUN.yaml` runs, what the demo runs per seed (Stages I-III) and what a study runs before its units
for a real run (`convert`, `cache`).

Plan, one step at a time, each recorded in `OUTPUT/pipeline.json` (atomically, after every step):
0. `convert`: the corpora named in `data.stage1_corpora` / `data.stage2_corpora` into the stages' training files
   (data/corpora.py; nothing to do when the run names its files), with a per-corpus report in the manifest;
1. `cache`: the prior encoder's features of every training image into `data.prior_cache` (skipped when unset);
2. `stage1`, `stage2`, `stage3`: the recipes on their resolved configs (runconfig.py), always with `resume: true`,
   so a run killed inside a stage continues from that stage's newest checkpoint, bit-identically;
3. `eval`: base VLM, Stage II (with the encoder) and the encoder-free student on `eval.benchmarks` (the eval runner
   skips the questions it already answered), then `OUTPUT/eval/summary.{md,csv,png}` over the three rows.
Under `torchrun` / `accelerate launch` every rank runs the plan: the stages and the eval share the work through
accelerate; `convert` and `cache` run on the main process while the others wait; only the main process writes the
manifest and removes folders. A step whose settings (its resolved config) match a finished record is never redone;
a step whose settings changed is refused with the keys that differ (use another output or `--from STEP`), or with
`on_changed="redo"` (the demo) redone with every later step. `--from STEP` reruns that step and every later one from
scratch; `--until STEP` stops after it. The manifest also holds the package versions, the training files' SHA-256
and each step's wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import PartialState

from medsynapse.eval.report import write_json
from medsynapse.recipes.trainer import latest_checkpoint, recorded_settings, run_settings
from medsynapse.runconfig import (
    RunConfig,
    baseline_file,
    rationale_file,
    resolve,
    stage1_file,
    stage2_file,
    stage_recipe,
)
from medsynapse.values import check_run

STEPS = ("convert", "cache", "stage1", "stage2", "stage3", "eval")
MANIFEST = "pipeline.json"


def file_sha256(path: str) -> str | None:
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(run: RunConfig, step: str) -> dict:
    """What a step's result depends on (compared with the manifest before the step is skipped)."""
    if step in ("stage1", "stage2", "stage3"):
        return recorded_settings(dataclasses.asdict(resolve(run, step)))  # the checkpoints' own rule
    if step == "convert":
        d = run.data
        return {"data_root": d.data_root, "subset_seed": d.subset_seed, "skip_bad": d.skip_bad,
                "stage1": [dataclasses.asdict(c) for c in d.stage1_corpora],
                "stage2": [dataclasses.asdict(c) for c in d.stage2_corpora], "files": _training_files(run),
                **({"rationale": [dataclasses.asdict(c) for c in d.rationale_corpora]} if d.rationale_corpora else {})}
    if step == "cache":
        return {"encoder": run.model.encoder, "files": _training_files(run), "prior_cache": run.data.prior_cache}
    return {**dataclasses.asdict(run.eval), "models": _eval_rows(run)}


def _training_files(run: RunConfig) -> list[str]:
    """Every file a stage or a baseline of the run trains on (the stages' first)."""
    return list(dict.fromkeys(f for f in (stage1_file(run), stage2_file(run), baseline_file(run),
                                          rationale_file(run)) if f))


def write_union(files: list[str], output: str) -> dict:
    """The baselines' file: every record of `files` in order (atomically), with the count from each."""
    from medsynapse.locking import write_text_atomic

    counts, lines = {}, []
    for file in files:
        text = Path(file).read_text()
        kept = [line for line in text.splitlines() if line.strip()]
        counts[file] = len(kept)
        lines += kept
    write_text_atomic(output, "".join(line + "\n" for line in lines))
    return {"files": counts, "records": len(lines)}


def _eval_rows(run: RunConfig) -> dict[str, str]:
    """The rows the eval step scores. With `eval.answer_format` unset, every model in the format it was trained in,
    and the base VLM (trained in neither) in both when the stages reply in the reasoning format (`base_reasoning`),
    as the study scores it."""
    out = Path(run.output)
    rows = {"base": run.model.vlm, "stage2": str(out / "stage2"), "student": str(out / "stage3_student")}
    if run.eval.answer_format is None and resolve(run, "stage2").answer_format == "reasoning":
        rows = {"base": run.model.vlm, "base_reasoning": run.model.vlm, **rows}
    return rows


def _read_manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def run_pipeline(run: RunConfig, start: str | None = None, until: str | None = None,
                 on_step: Callable[[str, int], None] | None = None, on_changed: str = "refuse") -> dict:
    """Run the plan (module docstring); returns the manifest. `on_step(step, n)` is called after each training step
    of each stage (progress; tests use it to simulate a kill). `on_changed`: what a step whose earlier result (a
    finished record, or a stage's checkpoints) has other settings does: `refuse` (ValueError naming the keys) or
    `redo` (that step and every later one start again; the demo's choice, whose settings are its config's)."""
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in STEPS:
            raise ValueError(f"{name} {value!r}: expected one of {STEPS}")
    if on_changed not in ("refuse", "redo"):
        raise ValueError(f"on_changed {on_changed!r}: expected 'refuse' or 'redo'")
    steps = list(STEPS[STEPS.index(start) if start else 0: STEPS.index(until) + 1 if until else len(STEPS)])
    # every value of every stage and baseline checked before anything runs; the memory bound of the stages it trains
    check_run(run, memory_for={step for step in steps if step in ("stage1", "stage2", "stage3")})
    state = PartialState(cpu=not torch.cuda.is_available())  # one process, or one per rank under torchrun
    main = state.is_main_process
    output = Path(run.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / MANIFEST
    manifest = _read_manifest(path)
    state.wait_for_everyone()  # every rank has read the manifest before the main process changes anything
    manifest.update(config=run.source, versions={p: version(p) for p in ("medsynapse", "torch", "transformers")})
    if start is not None:  # rerun this step and every later one from scratch
        _forget_from(run, manifest, start, main)
    for step in steps:
        settings = json.loads(json.dumps(_settings(run, step), default=str))
        done = manifest["steps"].get(step)
        if done is not None and done["settings"] != settings:
            changed = sorted(k for k in set(done["settings"]) | set(settings)
                             if done["settings"].get(k) != settings.get(k))
            if on_changed == "refuse":
                raise ValueError(f"{output}: step {step!r} finished with other settings ({', '.join(changed)} "
                                 f"differ); use another output or --from {step}")
            print(f"pipeline: {step} finished with other settings ({', '.join(changed)}); redoing it and later steps")
            _forget_from(run, manifest, step, main)
            done = None
        if done is not None:
            print(f"pipeline: {step} already finished, kept")
            continue
        stale = on_changed == "redo" and _stale_checkpoints(run, step)
        state.wait_for_everyone()  # every rank has looked at the checkpoints before they may be removed
        if stale:
            print(f"pipeline: {step}'s checkpoints are of other settings; starting it again")
            _forget_from(run, manifest, step, main)
        state.wait_for_everyone()
        print(f"pipeline: {step} ...", flush=True)
        began = time.perf_counter()
        report = _run_step(run, step, on_step) if main or step not in ("convert", "cache") else None
        state.wait_for_everyone()
        manifest["steps"][step] = {"settings": settings, "seconds": round(time.perf_counter() - began, 2),
                                   **({"report": report} if report else {})}
        if main:
            manifest["data_sha256"] = {f: file_sha256(f) for f in _training_files(run)}
            write_json(path, manifest)
    if main:
        manifest["data_sha256"] = {f: file_sha256(f) for f in _training_files(run)}
        write_json(path, manifest)
    state.wait_for_everyone()
    return manifest


def _forget_from(run: RunConfig, manifest: dict, step: str, remove: bool = True) -> None:
    """Drop `step` and every later step: their records, and their folders when `remove` (the main process)."""
    for later in STEPS[STEPS.index(step):]:
        manifest["steps"].pop(later, None)
        for folder in _step_folders(run, later) if remove else []:
            shutil.rmtree(folder, ignore_errors=True)


def _stale_checkpoints(run: RunConfig, step: str) -> bool:
    """Whether a stage's folder holds a checkpoint written with other settings (its resume would be refused)."""
    if step not in ("stage1", "stage2", "stage3"):
        return False
    config = resolve(run, step)
    checkpoint = latest_checkpoint(config.output_dir)
    if checkpoint is None:
        return False
    recorded = json.loads((checkpoint / "state.json").read_text()).get("settings")
    return recorded is not None and recorded != run_settings(config)


def _step_folders(run: RunConfig, step: str) -> list[Path]:
    if step in ("stage1", "stage2", "stage3"):
        return [Path(resolve(run, step).output_dir)]
    return [Path(run.output) / "eval"] if step == "eval" else []


def _run_step(run: RunConfig, step: str, on_step: Callable[[str, int], None] | None) -> dict | None:
    """Run one step; returns what it reports for the manifest (the convert step's per-corpus counts)."""
    hook = (lambda n, s=step: on_step(s, n)) if on_step is not None else None
    if step == "convert":
        from medsynapse.data.corpora import write_training_file

        d, report = run.data, {}
        for name, specs, file in (("stage1", d.stage1_corpora, stage1_file(run)),
                                  ("stage2", d.stage2_corpora, stage2_file(run))):
            if specs:
                report[name] = write_training_file(specs, d.data_root, file, d.subset_seed, d.skip_bad)
        if d.rationale_corpora:
            report["rationale"] = write_training_file(d.rationale_corpora, d.data_root, rationale_file(run),
                                                      d.subset_seed, d.skip_bad)
        if not d.baseline_file and baseline_file(run) not in (stage1_file(run), stage2_file(run)):  # both files
            report["baselines"] = write_union([stage1_file(run), stage2_file(run)], baseline_file(run))
        return report or None
    if step == "cache":
        if run.data.prior_cache:
            from medsynapse.recipes.priors import cache_features

            for file in _training_files(run):
                cache_features(run.model.encoder, file, run.data.prior_cache)
        return None
    if step in ("stage1", "stage2", "stage3"):
        stage_recipe(step)(dataclasses.replace(resolve(run, step), resume=True), on_step=hook)
        return None
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks
    from medsynapse.eval.summary import write_summary

    settings = EvalSettings(batch_size=run.eval.batch_size, max_new_tokens=run.eval.max_new_tokens,
                            answer_format=run.eval.answer_format, limit=run.eval.limit, engine=run.eval.engine)
    folders = {}
    for row, model in _eval_rows(run).items():
        folders[row] = Path(run.output) / "eval" / row
        row_settings = dataclasses.replace(settings, answer_format="reasoning") if row == "base_reasoning" else settings
        evaluate_benchmarks(model, run.eval.benchmarks, run.eval.data_root, folders[row], row_settings)
    if PartialState().is_main_process:
        print(write_summary(Path(run.output) / "eval", runs=folders))
    return None
