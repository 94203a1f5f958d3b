"""`medsynapse pipeline --config RUN.yaml`: from the run file's training files to a Table-1 summary, resumable.

Plan, one step at a time, each recorded in `OUTPUT/pipeline.json` (atomically, after every step):
1. `cache`: the prior encoder's features of every training image into `data.prior_cache` (skipped when unset);
2. `stage1`, `stage2`, `stage3`: the recipes on their resolved configs (runconfig.py), always with `resume: true`,
   so a run killed inside a stage continues from that stage's newest checkpoint, bit-identically;
3. `eval`: base VLM, Stage II (with the encoder) and the encoder-free student on `eval.benchmarks` (the eval runner
   skips the questions it already answered), then `OUTPUT/eval/summary.{md,csv,png}` over the three rows.
A step whose settings (its resolved config) match a finished record is never redone; a step whose settings changed
is refused with the keys that differ (use another output or `--from STEP`). `--from STEP` reruns that step and every
later one from scratch; `--until STEP` stops after it. The manifest also holds the package versions, the training
files' SHA-256 and each step's wall time.
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

from medsynapse.eval.report import write_json
from medsynapse.recipes.trainer import RESUMABLE_SETTINGS
from medsynapse.runconfig import RunConfig, resolve

STEPS = ("cache", "stage1", "stage2", "stage3", "eval")
MANIFEST = "pipeline.json"


def _sha256(path: str) -> str | None:
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
        settings = dataclasses.asdict(resolve(run, step))
        for key in RESUMABLE_SETTINGS:  # how, not what, is trained (the checkpoints' own rule)
            settings.pop(key, None)
        return settings
    if step == "cache":
        return {"encoder": run.model.encoder, "files": [run.data.stage1_file, run.data.stage2_file],
                "prior_cache": run.data.prior_cache}
    return {**dataclasses.asdict(run.eval), "models": _eval_rows(run)}


def _eval_rows(run: RunConfig) -> dict[str, str]:
    out = Path(run.output)
    return {"base": run.model.vlm, "stage2": str(out / "stage2"), "student": str(out / "stage3_student")}


def _read_manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def run_pipeline(run: RunConfig, start: str | None = None, until: str | None = None,
                 on_step: Callable[[str, int], None] | None = None) -> dict:
    """Run the plan (module docstring); returns the manifest. `on_step(step, n)` is called after each training step
    of each stage (progress; tests use it to simulate a kill)."""
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in STEPS:
            raise ValueError(f"{name} {value!r}: expected one of {STEPS}")
    steps = list(STEPS[STEPS.index(start) if start else 0: STEPS.index(until) + 1 if until else len(STEPS)])
    for stage in ("stage1", "stage2", "stage3"):
        resolve(run, stage)  # every stage's settings checked before anything runs
    output = Path(run.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / MANIFEST
    manifest = _read_manifest(path)
    manifest.update(config=run.source, versions={p: version(p) for p in ("medsynapse", "torch", "transformers")},
                    data_sha256={f: _sha256(f) for f in {run.data.stage1_file, run.data.stage2_file} if f})
    if start is not None:  # rerun this step and every later one from scratch
        for step in STEPS[STEPS.index(start):]:
            manifest["steps"].pop(step, None)
            for folder in _step_folders(run, step):
                shutil.rmtree(folder, ignore_errors=True)
    for step in steps:
        settings = json.loads(json.dumps(_settings(run, step), default=str))
        done = manifest["steps"].get(step)
        if done is not None:
            if done["settings"] != settings:
                changed = sorted(k for k in set(done["settings"]) | set(settings)
                                 if done["settings"].get(k) != settings.get(k))
                raise ValueError(f"{output}: step {step!r} finished with other settings ({', '.join(changed)} "
                                 f"differ); use another output or --from {step}")
            print(f"pipeline: {step} already finished, kept")
            continue
        print(f"pipeline: {step} ...", flush=True)
        began = time.perf_counter()
        _run_step(run, step, on_step)
        manifest["steps"][step] = {"settings": settings, "seconds": round(time.perf_counter() - began, 2)}
        write_json(path, manifest)
    write_json(path, manifest)
    return manifest


def _step_folders(run: RunConfig, step: str) -> list[Path]:
    if step in ("stage1", "stage2", "stage3"):
        return [Path(resolve(run, step).output_dir)]
    return [Path(run.output) / "eval"] if step == "eval" else []


def _run_step(run: RunConfig, step: str, on_step: Callable[[str, int], None] | None) -> None:
    hook = (lambda n, s=step: on_step(s, n)) if on_step is not None else None
    if step == "cache":
        if run.data.prior_cache:
            from medsynapse.recipes.priors import cache_features

            for file in dict.fromkeys(f for f in (run.data.stage1_file, run.data.stage2_file) if f):
                cache_features(run.model.encoder, file, run.data.prior_cache)
        return
    if step in ("stage1", "stage2", "stage3"):
        config = dataclasses.replace(resolve(run, step), resume=True)
        if step == "stage1":
            from medsynapse.recipes.stage1_warmup import train_stage1 as train
        elif step == "stage2":
            from medsynapse.recipes.stage2_ccr import train_stage2 as train
        else:
            from medsynapse.recipes.stage3_imt import train_stage3 as train
        train(config, on_step=hook)
        return
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks
    from medsynapse.eval.summary import write_summary

    settings = EvalSettings(batch_size=run.eval.batch_size, max_new_tokens=run.eval.max_new_tokens,
                            answer_format=run.eval.answer_format, limit=run.eval.limit)
    folders = {}
    for row, model in _eval_rows(run).items():
        folders[row] = Path(run.output) / "eval" / row
        evaluate_benchmarks(model, run.eval.benchmarks, run.eval.data_root, folders[row], settings)
    print(write_summary(Path(run.output) / "eval", runs=folders))
