"""`medsynapse study --config configs/study-synthmed.yaml [--rows a,b] [--seeds 0,1,2]`: Table 1 and the ablations
over training seeds, one resumable command.

A study file (StudyConfig) names a run file (the pipeline's: `model`, `data`, the stage sections, `baselines`; for
SynthMed also its `synthmed` section) and rows. A row is a model to evaluate (`base`, `stage1`, `stage2`, `stage3`
or a `baseline` method) after the row's overrides of the run file (`set: [KEY=VALUE, ...]`, as `--set`). The one
driver: `medsynapse demo` is this study over configs/study-demo.yaml's rows (demo_study), then demo.py's report;
`medsynapse pipeline` is a one-seed study of a run file's stages (pipeline_study, run_pipeline).

Plan:
1. shared by every row and seed: SynthMed's data, base VLM and prior encoder (steps/synthmed.prepare_shared, cached;
   a row whose `set` changes a base-VLM setting, `synthmed.base_vision_steps=0`, gets its own base VLM, and with
   `token_readability` each base VLM's lesion evidence in its visual tokens is measured: the visibility axis) and the
   prior encoder's features of every training image (one on-disk feature cache that every unit reads instead of
   encoding the images again: the same tensors, bit for bit), or for a real run its `convert` and `cache` steps
   (steps/prepare.py);
2. units: the trainings a (row, seed) needs (Stage I -> II -> III, or one baseline), each resolved exactly as
   `train` and `train baseline` resolve it (runconfig.py) and keyed by a hash of its settings and of the unit it
   starts from. Rows that need the same unit share it: every Stage II ablation trains from the one Stage I, every
   Stage III ablation from the one Stage II. A unit trains into OUTPUT/units/<kind>-s<seed>-<key> with
   `resume: true` (killed, it continues from its newest checkpoint, bit-identically) and is finished once its
   unit.json is written;
3. evaluations, one per distinct model (the base VLM once for every seed), into OUTPUT/evals/<unit>/: accuracy
   overall and per question type through the benchmark harness (`medsynapse eval`'s `evaluate_benchmarks`, resumable
   per question; every question's correctness kept for the paired test), the memory-reliance report (models with
   memory; M' with the study's `counterfactual` intervention) and the harness's batched ms/sample and peak memory;
   then, once every job is done, batch-1 latency and peak memory per row in a fresh process (measure_rows);
4. cells: (row, seed) -> OUTPUT/cells/<row>/seed_<K>.json (the evaluation's numbers, the units, wall time, the
   config hash); a cell whose file holds the same hash is never redone;
5. report: OUTPUT/study.json, table.md (mean ± sd and 95 % t-interval over seeds; per row a paired bootstrap over
   questions against its reference row, with the p-value: eval/stats.py), table.csv, accuracy.png and
   efficiency.png (accuracy against ms/sample: the paper's efficiency argument in one picture).
Jobs run in dependency order on `workers` processes (each with cores / workers threads; a worker dies with the study:
a killed study leaves no job running); of the jobs that can start, the one with the most work waiting on it first
(a Stage I before a baseline), so the independent baselines and evaluations fill the end instead of one worker idling
while the other finishes a chain. Progress: one line per job with the overall ETA. With `launcher: slurm` (or
`submitit-local`) each job is a submitit job instead (launch.py), at most `workers` at once.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medsynapse.config import ConfigError, from_dict, read_yaml
from medsynapse.engines import Engine
from medsynapse.eval.report import format_interval, format_p, mean_sd_ci, write_json
from medsynapse.eval.stats import adjust_family, compare
from medsynapse.locking import write_text_atomic
from medsynapse.recipes import registry
from medsynapse.recipes.registry import BASELINES, RECIPES, STAGES
from medsynapse.recipes.trainer import recorded_settings
from medsynapse.runconfig import RunConfig, resolve, resolve_baseline, run_config_from, with_seed
from medsynapse.values import check_engine_value, check_run

MODELS = ("base", *STAGES, "baseline")


@dataclass
class RowSpec:
    model: str  # base | stage1 | stage2 | stage3 (the encoder-free student) | baseline
    method: str = ""  # the baseline's method (runconfig.BASELINES) when model is `baseline`
    set: list[str] = field(default_factory=list)  # the run file's overrides, KEY=VALUE as --set
    reference: str = ""  # the row its paired test compares with ("" = the study's reference; "none" = no test)
    group: str = "Table 1"  # the table section
    label: str = ""  # the table's name for it (default: the row's key)
    answer_format: str = ""  # "": scored in the format the model was trained in; direct | reasoning: in that one
    # The line of the visibility plot (visibility.png) this row belongs to: the rows of one series differ in the
    # SynthMed settings their `set` changes (e.g. synthmed.base_vision_steps), each placed at the measured
    # readability of its base VLM's visual tokens (`token_readability`). "": not plotted.
    series: str = ""


@dataclass
class StudyConfig:
    run: str = ""  # the run file every row starts from (relative to the study file's folder, or to the cwd)
    output: str = "runs/study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    reference: str = "medsynapse_v"  # the row every other row is compared with (unless its `reference` says)
    rows: dict[str, RowSpec] = field(default_factory=dict)
    rows_from: str = ""  # a study file whose rows come first (relative to this file); this file's rows on top
    benchmarks: list[str] = field(default_factory=list)  # empty: the run file's eval.benchmarks (SynthMed: synthmed)
    data_root: str = ""  # empty: the run file's eval.data_root (SynthMed: the cached split)
    eval_batch_size: int = 64
    eval_engine: Engine = "hf"  # hf: transformers' generate | vllm: vLLM with the memory injected (needs .venv-vllm)
    max_new_tokens: int | None = None  # None: each benchmark's protocol budget
    reasoning_tokens: int | None = None  # reasoning-format rows (CoT-SFT, Coconut, IVT-LR); None: the harness's 1024
    counterfactual: str = ""  # M' for the reliance report; empty: the run file's stage2 intervention
    reliance_conditions: list[str] = field(default_factory=lambda: ["zeroed", "shuffled", "counterfactual"])
    reliance_limit: int = 0  # questions of the first benchmark in the reliance report (0: all)
    limit: int | None = None  # the first N scored questions per benchmark (smoke runs; `pipeline`: eval.limit)
    latency_samples: int = 20  # batch-1 answers timed per row, in a fresh process, after every job (0: none)
    bootstrap_resamples: int = 10_000
    bootstrap_seed: int = 0
    correction: str = "holm"  # p-value adjustment over each table's comparisons: holm | bh (Benjamini-Hochberg)
    # What `--plan` prices (accelerator-hours): seconds per optimiser step of each kind of unit (stage1, stage2,
    # stage3, sft, cot-sft, grpo, coconut, mcout, ivt-lr), seconds per scored question per answer format, and the
    # scored questions per benchmark. Measured or estimated as the study file says; a missing entry prices at 0.
    costs: dict = field(default_factory=dict)
    workers: int = 1  # jobs at once, each in its own process with cores / workers threads (1: in this process)
    # local: the jobs on `workers` processes here; slurm: each job a SLURM job through submitit, at most `workers`
    # at once, with the `cluster` parameters; submitit-local: the same path with submitit's local executor
    launcher: Literal["local", "submitit-local", "slurm"] = "local"
    # submitit's executor parameters for slurm / submitit-local (AutoExecutor names: timeout_min, gpus_per_node,
    # tasks_per_node, cpus_per_task, mem_gb, nodes, slurm_partition, slurm_account, ...); logs in OUTPUT/submitit
    cluster: dict = field(default_factory=dict)
    # SynthMed: per base VLM the rows use, how well lesion presence is read linearly from its merged visual tokens
    # (steps/synthmed.token_readability, cached): the visibility axis, measured, in study.json's `shared.levels`.
    token_readability: bool = False


# --- reading ----------------------------------------------------------------------------------------------------


def read_study(path: str | Path, rows: list[str] | None = None, seeds: list[int] | None = None,
               overrides: list[str] | None = None) -> tuple[StudyConfig, dict, str]:
    """The study file (strict), restricted to `rows` / `seeds` when given; returns it, the run file's raw mapping
    and the run file's path."""
    path = Path(path)
    study = _study_file(path, overrides or [])
    if seeds is not None:
        study.seeds = seeds
    check_study(study, str(path))  # the whole file, before --rows keeps some of its rows
    if rows is not None:
        unknown = [r for r in rows if r not in study.rows]
        if unknown:
            raise ConfigError(f"{path}: unknown row(s) {unknown}; known: {list(study.rows)}")
        study.rows = {name: study.rows[name] for name in rows}  # a row whose reference is left out gets no test
    run_path = Path(study.run) if Path(study.run).is_file() else path.parent / study.run
    if not study.run or not run_path.is_file():
        raise ConfigError(f"{path}.run: run file {study.run!r} not found (relative to the cwd or to the study file)")
    raw = read_yaml(run_path) or {}
    check_rows(study, raw, str(run_path), str(path))
    return study, raw, str(run_path)


def _study_file(path: Path, overrides: list[str]) -> StudyConfig:
    """The study file with its rows (those of `rows_from` first), strict; not yet checked as a whole."""
    from medsynapse.config import apply_overrides

    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    data = apply_overrides(dict(read_yaml(path) or {}), overrides)
    study = from_dict(StudyConfig, data, str(path))
    specs = dict(data.get("rows") or {})
    if study.rows_from:
        other = path.parent / study.rows_from
        if not other.is_file():
            raise ConfigError(f"{path}.rows_from: {other} not found")
        specs = {**((read_yaml(other) or {}).get("rows") or {}), **specs}
    study.rows = {name: from_dict(RowSpec, dict(spec or {}), f"{path}.rows.{name}") for name, spec in specs.items()}
    return study


DEMO_STUDY = "study-demo.yaml"  # the demo's rows (bundled; config.find_config)


def demo_study(run_path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, dict, str]:
    """`medsynapse demo`: the rows of configs/study-demo.yaml over a SynthMed run file (with `overrides`), chosen by
    its `synthmed` section: the controls (the `baseline` rows) when `controls`, the ablations (the rows with a `set`)
    when `ablations`; its seeds (`seeds`, else `seed`), `output` and `eval_batch_size`. Returns what read_study
    returns, every row checked as a study's are."""
    from medsynapse.config import apply_overrides, find_config
    from medsynapse.steps.synthmed import check_settings, demo_settings

    run_path = Path(run_path)
    if not run_path.is_file():
        raise ConfigError(f"{run_path}: config file not found (run from the repository root, or pass --config "
                          "with a copy of configs/synthmed.yaml)")
    raw = apply_overrides(dict(read_yaml(run_path) or {}), overrides or [])
    run = run_config_from(raw, str(run_path))
    if not run.synthmed:
        raise ConfigError(f"{run_path}: the demo needs a `synthmed` section (configs/synthmed.yaml); a run file "
                          "without it is trained by `medsynapse pipeline`")
    config = demo_settings(run)
    check_settings(run, config)  # a bad setting fails before the shared steps run
    study_path = find_config(DEMO_STUDY)
    study = _study_file(study_path, [])
    study.rows = {name: row for name, row in study.rows.items()
                  if (config.controls or row.model != "baseline") and (config.ablations or not row.set)}
    study.run, study.output = str(run_path), run.output
    study.seeds = list(config.seeds) or [config.seed]
    study.eval_batch_size = config.eval_batch_size
    check_study(study, str(study_path))
    check_rows(study, raw, str(run_path), str(study_path))
    check_plan(study, raw, str(run_path))
    return study, raw, str(run_path)


PIPELINE_STEPS = ("convert", "cache", *STAGES, "eval")


def pipeline_study(run_path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, dict, str]:
    """`medsynapse pipeline` on a run file without `synthmed`: a study of one seed (the stages' own) whose rows are
    the base VLM (also in the reasoning format when the stages reply in it and `eval.answer_format` is unset), Stage
    II and the encoder-free student, scored with the run file's `eval` settings (benchmarks, data root, batch size,
    token budget, answer format, limit, engine), compared with Stage II. No reliance report and no batch-1 timing:
    a pipeline trains and scores the stages; a study file's rows ask for those. Returns what read_study returns."""
    from medsynapse.config import apply_overrides
    from medsynapse.runconfig import read_run_config

    run_path = Path(run_path)
    run = read_run_config(run_path, overrides)  # not a run file: one line saying why
    raw = apply_overrides(dict(read_yaml(run_path) or {}), overrides or [])
    seeds = {stage: resolve(run, stage).seed for stage in STAGES}
    if len(set(seeds.values())) > 1:
        raise ConfigError(f"{run_path}: the stages' seeds differ ({seeds}); a pipeline trains the three at one seed "
                          "(set `seed` in each stage section alike, or run a study over several seeds)")
    fmt = run.eval.answer_format or ""
    rows = {"base": RowSpec("base", label="base VLM", answer_format=fmt)}
    if not fmt and resolve(run, "stage2").answer_format == "reasoning":  # as a study scores the base then
        rows["base_reasoning"] = RowSpec("base", label="base VLM (reasoning format)", answer_format="reasoning")
    rows |= {"stage2": RowSpec("stage2", label="Stage II (MedSynapse-V)", answer_format=fmt),
             "student": RowSpec("stage3", label="Stage III student (encoder-free)", answer_format=fmt)}
    study = StudyConfig(run=str(run_path), output=run.output, seeds=[seeds["stage1"]], reference="stage2",
                        rows=rows, benchmarks=list(run.eval.benchmarks), data_root=run.eval.data_root,
                        eval_batch_size=run.eval.batch_size, eval_engine=run.eval.engine,
                        max_new_tokens=run.eval.max_new_tokens, reasoning_tokens=run.eval.max_new_tokens,
                        limit=run.eval.limit, reliance_conditions=[], latency_samples=0)
    for row in study.rows.values():
        row.group = "pipeline"
    return study, raw, str(run_path)


def run_pipeline(study: StudyConfig, raw: dict, source: str, start: str | None = None,
                 until: str | None = None) -> dict:
    """`medsynapse pipeline`'s steps (PIPELINE_STEPS) over pipeline_study's study: `start` redoes that step and
    every later one from scratch (forget_from); `until` stops after that step (`convert` / `cache`: the preparation
    only; a stage: its units only, no evaluation). Each stage's folder in the run file (OUTPUT/stage1, stage2,
    stage3_student) is then a link to its unit, so `train`, `eval` and `serve` find it where they always did.
    Returns study.json's content, {"prepare": record} or {"units": ...}; {} in a process other than the main."""
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in PIPELINE_STEPS:
            raise ValueError(f"{name} {value!r}: expected one of {PIPELINE_STEPS}")
    run = run_config_from(raw, source)
    steps = PIPELINE_STEPS[: PIPELINE_STEPS.index(until) + 1] if until else PIPELINE_STEPS
    check_run(run, memory_for={step for step in steps if step in STAGES})  # before anything is removed or built
    state = processes()
    if start is not None:
        if state is None or state.is_main_process:
            forget_from(study, raw, source, start)
        if state is not None:
            state.wait_for_everyone()
    if until in ("convert", "cache"):
        Path(study.output).mkdir(parents=True, exist_ok=True)
        with _main_process_first(state):
            report = prepare(study, raw, source, until)[2]
        return {"prepare": report["prepare"]} if state is None or state.is_main_process else {}
    if until in STAGES:
        study = dataclasses.replace(study, rows={until: RowSpec(until, reference="none", group="pipeline")})
    result = run_study(study, raw, source, train_only=until is not None)
    if result:
        link_stage_folders(study, raw, source)
    return result


def forget_from(study: StudyConfig, raw: dict, source: str, step: str) -> None:
    """`pipeline --from STEP`: that step and every later one start again. The preparation's record from that step
    on; the plan's units of that stage and later (all of them from `convert` / `cache`); every evaluation and cell of
    the plan (the eval step follows every other)."""
    import shutil

    from medsynapse.steps.prepare import forget_steps

    run = run_config_from(raw, source)
    output = Path(study.output)
    if step in ("convert", "cache"):
        forget_steps(run, step)
    plan = plan_study(study, raw, source, None, _eval_source(study, run), output)
    first = STAGES.index(step) if step in STAGES else len(STAGES) if step == "eval" else 0
    folders = [Path(u.config.output_dir) for u in plan.units.values() if STAGES.index(u.kind) >= first]
    folders += [Path(e.output) for e in plan.evaluations.values()]
    for folder in folders:
        if folder.exists():
            print(f"pipeline: --from {step}: removing {folder}")
            shutil.rmtree(folder)
    for row, seed in plan.cells:
        (output / "cells" / row / f"seed_{seed}.json").unlink(missing_ok=True)


def link_stage_folders(study: StudyConfig, raw: dict, source: str) -> dict[str, str]:
    """Each finished stage unit of the study's deepest chain, linked where the run file puts that stage
    (runconfig.resolve's output_dir). Returns {link: unit folder}."""
    from medsynapse.locking import link_folder

    run = run_config_from(raw, source)
    plan = plan_study(study, raw, source, None, _eval_source(study, run), Path(study.output))
    chains = [[plan.units[name] for name in cell["units"]] for cell in plan.cells.values()]
    linked = {}
    for unit in max(chains, key=len, default=[]):
        if unit.kind in STAGES and (Path(unit.config.output_dir) / "unit.json").is_file():
            link = Path(resolve(run, unit.kind).output_dir)
            if link_folder(link, Path(unit.config.output_dir)):
                linked[str(link)] = unit.config.output_dir
    return linked


def check_rows(study: StudyConfig, raw: dict, source: str, where: str, memory: bool = False) -> None:
    """Every row's run (the run file with the row's `set` on top) checked as `pipeline` and `train` check theirs
    (values.check_run), before anything is planned, built or trained; `memory`: with each step's memory bound."""
    for name, row in study.rows.items():
        trains = {row.method} if row.model == "baseline" else set(STAGES[:STAGES.index(row.model) + 1]) \
            if row.model in STAGES else set()
        try:
            check_run(row_run(raw, source, row, study.seeds[0], None), memory=memory, memory_for=trains)
        except ConfigError as err:
            raise ConfigError(f"{where}.rows.{name}: {err}") from None


def check_study(study: StudyConfig, where: str) -> None:
    if not study.rows:
        raise ConfigError(f"{where}.rows: no rows")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"{where}.seeds: expected distinct seeds, got {study.seeds}")
    if study.workers < 1:
        raise ConfigError(f"{where}.workers: expected >= 1, got {study.workers}")
    for name, row in study.rows.items():
        if row.model not in MODELS:
            raise ConfigError(f"{where}.rows.{name}.model: {row.model!r}; expected one of {MODELS}")
        if (row.model == "baseline") != bool(row.method) or (row.method and row.method not in BASELINES):
            raise ConfigError(f"{where}.rows.{name}.method: {row.method!r}; a `baseline` row names one of "
                              f"{list(BASELINES)}, other rows none")
        if row.reference not in ("", "none", *study.rows):
            raise ConfigError(f"{where}.rows.{name}.reference: {row.reference!r} is not a row of this study")
        if row.answer_format not in ("", "direct", "reasoning"):
            raise ConfigError(f"{where}.rows.{name}.answer_format: {row.answer_format!r}; expected direct or "
                              "reasoning (empty: as trained)")
    if study.correction not in ("holm", "bh"):
        raise ConfigError(f"{where}.correction: {study.correction!r}; expected holm or bh")
    unknown = sorted(set(study.costs) - {"step_s", "question_s", "questions"})
    if unknown:
        raise ConfigError(f"{where}.costs: unknown key(s) {unknown}; expected step_s, question_s, questions")
    if study.launcher == "local" and study.cluster:
        raise ConfigError(f"{where}.cluster: submitit's parameters, for launcher slurm or submitit-local; this "
                          "study's launcher is local")
    check_engine_value(study.eval_engine, f"{where}.eval_engine")
    if study.launcher != "local":  # submitit's own check of every parameter, before anything runs
        from medsynapse.launch import check_cluster

        check_cluster(study.cluster, where)


# --- planning ---------------------------------------------------------------------------------------------------


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Unit:
    """One training: a recipe's config, trained into `folder`."""

    kind: str  # stage1 | stage2 | stage3 | a baseline method
    seed: int
    key: str
    config: Any
    after: str | None = None  # the name of the unit it starts from

    @property
    def name(self) -> str:
        return f"{BASELINES.get(self.kind, self.kind)}-s{self.seed}-{self.key}"


@dataclass
class Evaluation:
    """One model's evaluation (shared by every cell that evaluates the same model)."""

    name: str  # `base` or the unit's name
    model: str  # its folder
    output: str
    benchmarks: list[str]
    data_root: str
    eval_batch_size: int
    max_new_tokens: int | None
    reasoning_tokens: int | None
    counterfactual: str
    reliance_conditions: list[str]
    reliance_limit: int
    after: str | None = None  # the unit that trains the model
    answer_format: str = ""  # "": the format the model was trained in
    engine: str = "hf"  # generation: transformers (hf) or vLLM
    limit: int | None = None  # the first N scored questions per benchmark (None: all)

    def settings(self) -> dict:
        settings = {k: v for k, v in asdict(self).items() if k not in ("output", "model", "after")}
        # a default is left out, so that evaluations written before the setting existed keep their settings
        for key, default in (("answer_format", ""), ("engine", "hf"), ("limit", None)):
            if settings[key] == default:
                settings.pop(key)
        return settings


def _settings(config: Any) -> dict:
    return recorded_settings(asdict(config))  # how, not what, is trained is not in a unit's key


def row_run(raw: dict, source: str, row: RowSpec, seed: int, shared: Any) -> RunConfig:
    """The run file with the row's overrides, every stage at training seed `seed`, SynthMed's folders filled in
    (`shared`: one Shared, or the `synthmed_shareds` mapping, from which the row's own is taken)."""
    run = with_seed(run_config_from(raw, source, row.set), seed)
    if shared is not None:  # SynthMed: the cached base VLM, encoder and training file
        from medsynapse.steps.synthmed import demo_settings, fill_shared, shared_key

        if isinstance(shared, dict):
            shared = shared[shared_key(demo_settings(run))]
        run = fill_shared(run, shared)
        if not run.data.prior_cache:
            data = dataclasses.replace(run.data, prior_cache=str(shared_prior_cache(shared)))
            run = dataclasses.replace(run, data=data)
    return run


def synthmed_shareds(study: StudyConfig, raw: dict, source: str, build: bool) -> dict[str, Any]:
    """SynthMed's shared folders of every row, {steps.synthmed.shared_key: Shared}: a row whose `set` changes a
    `synthmed` setting a folder depends on (e.g. `synthmed.base_vision_steps`, the visibility axis) gets its own base
    VLM; every row must keep the one test split they are all scored on. `build`: prepared (cached), else named."""
    from medsynapse.steps.synthmed import demo_settings, planned_shared, prepare_shared, shared_key

    shareds: dict[str, Any] = {}
    data = None
    for name, row in study.rows.items():
        config = demo_settings(run_config_from(raw, source, row.set))
        key = shared_key(config)
        if key not in shareds:
            shareds[key] = prepare_shared(config) if build else planned_shared(config)
        if data is None:
            data = shareds[key].data
        elif shareds[key].data != data:
            raise ConfigError(f"study.rows.{name}: its `set` changes SynthMed's data ({shareds[key].data.name}, the "
                              f"other rows {data.name}); the rows are scored on one test split: vary what the data "
                              "does not shape (the base VLM's or the encoder's settings)")
    return shareds


def row_levels(study: StudyConfig, raw: dict, source: str, shareds: dict[str, Any]) -> dict[str, list[str]]:
    """{shared key: the rows that use it}."""
    from medsynapse.steps.synthmed import demo_settings, shared_key

    levels: dict[str, list[str]] = {key: [] for key in shareds}
    for name, row in study.rows.items():
        levels[shared_key(demo_settings(run_config_from(raw, source, row.set)))].append(name)
    return levels


def shared_prior_cache(shared: Any) -> Path:
    """SynthMed's prior-feature cache, beside its data in the demo cache (keyed inside by encoder and image bytes)."""
    return Path(shared.data).parent / "prior-features"


def plan_units(run: RunConfig, row: RowSpec, seed: int, units_dir: Path) -> list[Unit]:
    """The trainings the row's model needs, in order; each keyed by its settings and the unit it starts from."""
    if row.model == "base":
        return []
    if row.model == "baseline":
        config = resolve_baseline(run, row.method)
        key = _key(row.method, _settings(config))
        unit = Unit(row.method, seed, key, config)
        return [dataclasses.replace(unit, config=_placed(config, units_dir / unit.name))]
    units: list[Unit] = []
    for stage in STAGES[: STAGES.index(row.model) + 1]:
        config = resolve(run, stage)
        settings = _settings(config)
        previous = units[-1] if units else None
        if previous is not None:
            settings.pop("model")  # the folder it starts from: keyed by that unit instead
        unit = Unit(stage, seed, _key(stage, settings, previous.key if previous else None), config,
                    previous.name if previous else None)
        moved = {"model": previous.config.output_dir} if previous else {}
        units.append(dataclasses.replace(unit, config=_placed(config, units_dir / unit.name, **moved)))
    return units


def _placed(config: Any, folder: Path, **changes) -> Any:
    return dataclasses.replace(config, output_dir=str(folder), resume=True, **changes)


@dataclass
class Plan:
    units: dict[str, Unit]
    evaluations: dict[str, Evaluation]
    cells: dict[tuple[str, int], dict]  # (row, seed) -> {"evaluation": name, "units": [...], "hash": ...}


def plan_study(study: StudyConfig, raw: dict, source: str, shared: Any, eval_source: tuple[list[str], str],
               output: Path) -> Plan:
    units: dict[str, Unit] = {}
    evaluations: dict[str, Evaluation] = {}
    cells: dict[tuple[str, int], dict] = {}
    benchmarks, data_root = eval_source
    for seed in study.seeds:
        for name, row in study.rows.items():
            run = row_run(raw, source, row, seed, shared)
            chain = plan_units(run, row, seed, output / "units")
            for unit in chain:
                units.setdefault(unit.name, unit)
            # the base VLM: one per base-VLM setting when rows have their own (a visibility axis), named by its folder
            base = "base" if not isinstance(shared, dict) or len(shared) == 1 else f"base-{_key(run.model.vlm)[:8]}"
            model_name = (chain[-1].name if chain else base) + (f"-{row.answer_format}" if row.answer_format else "")
            model_dir = chain[-1].config.output_dir if chain else run.model.vlm
            counterfactual = study.counterfactual or resolve(run, "stage2").intervention
            evaluation = Evaluation(model_name, model_dir, str(output / "evals" / model_name), benchmarks, data_root,
                                    study.eval_batch_size, study.max_new_tokens, study.reasoning_tokens,
                                    counterfactual, list(study.reliance_conditions), study.reliance_limit,
                                    chain[-1].name if chain else None, row.answer_format, study.eval_engine,
                                    study.limit)
            if evaluations.setdefault(model_name, evaluation).settings() != evaluation.settings():
                raise ConfigError(f"study: rows sharing the model {model_name} ask for different evaluations "
                                  "(e.g. another counterfactual); set the study's `counterfactual`")
            cells[(name, seed)] = {"evaluation": model_name, "units": [u.name for u in chain],
                                   "hash": _key(model_name, evaluation.settings(),
                                                run.model.vlm if not chain else None)}
    refuse_rows_equal_to_their_reference(study, cells)
    return Plan(units, evaluations, cells)


def check_plan(study: StudyConfig, raw: dict, source: str) -> None:
    """The plan's own refusals (a row equal to its reference; rows asking one model for two evaluations) before
    anything is built: planned on the folders SynthMed's cache would give (named, not built)."""
    run = run_config_from(raw, source)
    if run.synthmed:
        shared, eval_source = synthmed_shareds(study, raw, source, build=False), (study.benchmarks or ["synthmed"],
                                                                                  study.data_root)
    else:
        shared, eval_source = None, _eval_source(study, run)
    plan_study(study, raw, source, shared, eval_source, Path(study.output))


def refuse_rows_equal_to_their_reference(study: StudyConfig, cells: dict[tuple[str, int], dict]) -> None:
    """An ablation must change something: a row whose model (the same units, scored the same way) is its reference's
    would report a difference of exactly 0 as a result. One line naming both rows and what they share."""
    for name in study.rows:
        reference = _reference(study, name)
        if reference is None:
            continue
        for seed in study.seeds:
            mine, theirs = cells[(name, seed)], cells[(reference, seed)]
            if mine["evaluation"] == theirs["evaluation"]:
                shared = mine["units"][-1] if mine["units"] else mine["evaluation"]
                raise ConfigError(f"study: row {name!r} resolves to the same model as its reference {reference!r} "
                                  f"(unit {shared}): its `set` changes nothing the run file does not already say")


# --- what a plan costs and what each row trains on ------------------------------------------------------------------


def unit_format(unit: Unit | None) -> str:
    """The answer format a unit's model is trained to reply in (None: the base VLM, which answers directly)."""
    if unit is None:
        return "direct"
    config = unit.config
    trained_on = getattr(config, "target", None)  # SFT's target decides its format; the latent rows always reason
    if trained_on == "rationale" or (trained_on is None and RECIPES[unit.kind].answer_format == "reasoning"):
        return "reasoning"
    return getattr(config, "answer_format", "direct") or "direct"


def planned_steps(config: Any, records: int | None) -> int | None:
    """Optimiser steps of a unit: its max_steps, else epochs over `records` at its batch size (None: unknown size)."""
    from medsynapse.recipes.coconut import n_stages

    batch = config.batch_size
    if hasattr(config, "steps_per_stage"):  # Coconut / IVT-LR: per curriculum stage
        per_stage = config.steps_per_stage or (math.ceil(config.epochs_per_stage * records / batch)
                                               if records else None)
        return per_stage * n_stages(config.max_latent_stage, config.final_stage) if per_stage is not None else None
    if getattr(config, "max_steps", 0) > 0:
        return config.max_steps
    epochs = getattr(config, "epochs", 0)
    return math.ceil(epochs * records / batch) if records else None


def planned_records(run: RunConfig) -> dict[str, int]:
    """Records of each training file before it exists: the sizes of the corpora the convert step writes into it."""
    from medsynapse.runconfig import baseline_file, rationale_file, stage1_file, stage2_file

    def total(specs: list) -> int:
        return sum(spec.size for spec in specs) if specs and all(spec.size for spec in specs) else 0

    d = run.data
    sizes = {stage1_file(run): total(d.stage1_corpora), stage2_file(run): total(d.stage2_corpora)}
    sizes.setdefault(baseline_file(run), sizes[stage1_file(run)] + sizes[stage2_file(run)])
    sizes.setdefault(rationale_file(run), total(d.rationale_corpora))
    return {file: n for file, n in sizes.items() if file and n}


def _file_facts(file: str, planned: dict[str, int]) -> dict:
    """A training file's SHA-256 and records when it exists (else the planned count, sha256 None)."""
    path = Path(file)
    if path.is_file():
        stat = path.stat()
        return {"file": file, **_hashed(file, stat.st_size, stat.st_mtime_ns)}
    return {"file": file, "sha256": None, "records": planned.get(file)}


@functools.lru_cache(maxsize=64)
def _hashed(file: str, size: int, mtime_ns: int) -> dict:
    """SHA-256 and records of one version of a file (keyed by size and mtime): every row's units read the same
    few files, so each is read once per plan, not once per unit."""
    from medsynapse.steps.prepare import file_sha256

    with open(file, "rb") as handle:
        records = sum(1 for line in handle if line.strip())
    return {"sha256": file_sha256(file), "records": records}


def parity_table(study: StudyConfig, plan: Plan, runs: dict[str, RunConfig] | None = None) -> dict:
    """Per row (its first seed): every unit it trains with its training file (SHA-256, records), optimiser steps,
    batch and the samples seen (steps x batch; Stage II and GRPO-only: prompts, each with group_size rollouts)."""
    runs = runs or {}
    table = {}
    for name in study.rows:
        cell = plan.cells[(name, study.seeds[0])]
        units = []
        for unit_name in cell["units"]:
            unit = plan.units[unit_name]
            facts = _file_facts(unit.config.train_file, planned_records(runs[name]) if name in runs else {})
            steps = planned_steps(unit.config, facts["records"])
            units.append({"unit": unit_name, "kind": unit.kind, **facts, "steps": steps,
                          "batch": unit.config.batch_size,
                          "samples_seen": steps * unit.config.batch_size if steps is not None else None,
                          **({"rollouts_per_prompt": unit.config.group_size}
                             if hasattr(unit.config, "group_size") else {})})
        table[name] = {"units": units, "samples_seen": sum(u["samples_seen"] or 0 for u in units),
                       "files": sorted({u["file"] for u in units})}
    return table


def parity_markdown(parity: dict) -> str:
    lines = ["**Training data per row** (first seed's units; samples seen = steps × batch; RL units: prompts)", "",
             "| row | unit | file | SHA-256 | records | steps | batch | samples seen |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in parity.items():
        for unit in row["units"] or [{"unit": "—", "file": "—", "sha256": None, "records": None, "steps": None,
                                      "batch": None, "samples_seen": None}]:
            sha = unit["sha256"][:12] if unit["sha256"] else "—"
            lines.append(f"| {name} | {unit['unit'].split('-s')[0]} | {Path(unit['file']).name} | {sha} | "
                         f"{unit['records'] if unit['records'] is not None else '—'} | "
                         f"{unit['steps'] if unit['steps'] is not None else '—'} | {unit['batch'] or '—'} | "
                         f"{unit['samples_seen'] if unit['samples_seen'] is not None else '—'} |")
    return "\n".join(lines)


def _hours(seconds: float) -> float:
    return round(seconds / 3600, 2)


def describe_plan(study: StudyConfig, raw: dict, source: str) -> dict:
    """`medsynapse study --plan`: every row with its units (keys) per seed, its reference and answer format, the
    distinct units and models to evaluate, the data parity table, and accelerator-hours from `study.costs`: per row
    alone (everything it needs) and added (what no earlier row already needs), and in all. Builds, trains and
    evaluates nothing (SynthMed's cached folders are named by their content keys, built or not)."""
    run = run_config_from(raw, source)
    shared = None
    if run.synthmed:
        shared = synthmed_shareds(study, raw, source, build=False)
        eval_source = (study.benchmarks or ["synthmed"], study.data_root or str(next(iter(shared.values())).data))
    else:
        eval_source = (study.benchmarks or list(run.eval.benchmarks), study.data_root or run.eval.data_root)
    output = Path(study.output)
    plan = plan_study(study, raw, source, shared, eval_source, output)
    runs = {name: row_run(raw, source, spec, study.seeds[0], shared) for name, spec in study.rows.items()}
    step_s, question_s = study.costs.get("step_s", {}), study.costs.get("question_s", {})
    questions = sum(int(study.costs.get("questions", {}).get(b, 0)) for b in eval_source[0])
    first_questions = int(study.costs.get("questions", {}).get(eval_source[0][0], 0))

    def unit_seconds(unit: Unit, records: dict[str, int]) -> float:
        facts = _file_facts(unit.config.train_file, records)
        return (planned_steps(unit.config, facts["records"]) or 0) * float(step_s.get(unit.kind, 0))

    def eval_seconds(evaluation: Evaluation) -> float:
        unit = plan.units.get(evaluation.after) if evaluation.after else None
        answer_format = evaluation.answer_format or unit_format(unit)
        seconds = questions * float(question_s.get(answer_format, 0))
        if unit is not None and unit.kind in STAGES and evaluation.reliance_conditions:  # the reliance passes
            scored = min(evaluation.reliance_limit or first_questions, first_questions)
            seconds += len(evaluation.reliance_conditions) * scored * float(question_s.get(answer_format, 0))
        return seconds

    counted: dict[str, float] = {}  # job -> seconds, each distinct unit and evaluation once
    rows = {}
    for name, spec in study.rows.items():
        records = planned_records(runs[name])
        alone = added = 0.0
        for seed in study.seeds:
            cell = plan.cells[(name, seed)]
            jobs = [(u, unit_seconds(plan.units[u], records)) for u in cell["units"]]
            jobs.append((f"eval {cell['evaluation']}", eval_seconds(plan.evaluations[cell["evaluation"]])))
            for job, seconds in jobs:
                alone += seconds
                if job not in counted:
                    counted[job] = seconds
                    added += seconds
        last = plan.cells[(name, study.seeds[0])]["units"]
        rows[name] = {"label": spec.label or name, "group": spec.group, "reference": _reference(study, name),
                      "set": spec.set,
                      "answer_format": spec.answer_format or unit_format(plan.units[last[-1]] if last else None),
                      "units": {str(seed): plan.cells[(name, seed)]["units"] for seed in study.seeds},
                      "evaluation": {str(seed): plan.cells[(name, seed)]["evaluation"] for seed in study.seeds},
                      "hours_alone": _hours(alone), "hours_added": _hours(added)}
    kinds: dict[str, int] = {}
    for unit in plan.units.values():
        kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
    training = sum(seconds for job, seconds in counted.items() if not job.startswith("eval "))
    evaluation = sum(seconds for job, seconds in counted.items() if job.startswith("eval "))
    per_seed = {kind: count / len(study.seeds) for kind, count in kinds.items()}
    return {"study": source, "seeds": study.seeds, "rows": rows,
            "distinct": {"units": len(plan.units), "units_by_kind": kinds, "units_per_seed_by_kind": per_seed,
                         "evaluations": len(plan.evaluations), "cells": len(plan.cells)},
            "benchmarks": eval_source[0], "scored_questions_per_model": questions,
            "costs": study.costs, "hours": {"training": _hours(training), "evaluation": _hours(evaluation),
                                            "total": _hours(training + evaluation)},
            "parity": parity_table(study, plan, runs)}


def plan_markdown(plan: dict) -> str:
    """The plan of `describe_plan` as a table (rows, units per seed, hours) and the distinct counts."""
    lines = [f"Study {plan['study']}: seeds {plan['seeds']}; benchmarks {', '.join(plan['benchmarks'])} "
             f"({plan['scored_questions_per_model']} scored questions per model)", "",
             "| row | format | vs | units (first seed) | hours alone | hours added |", "|---|---|---|---|---|---|"]
    for name, row in plan["rows"].items():
        units = ", ".join(next(iter(row["units"].values()))) or "—"
        lines.append(f"| {name} | {row['answer_format']} | {row['reference'] or '—'} | {units} | "
                     f"{row['hours_alone']} | {row['hours_added']} |")
    distinct = plan["distinct"]
    lines += ["", f"Distinct: {distinct['units']} units ({distinct['units_by_kind']}), {distinct['evaluations']} "
              f"models to evaluate, {distinct['cells']} cells. Hours: {plan['hours']}"]
    return "\n".join(lines)


# --- jobs (run in a worker process, or in this one) --------------------------------------------------------------


def train_unit(unit: Unit) -> dict:
    """Train the unit (resuming its checkpoints) unless finished; returns its unit.json."""
    folder = Path(unit.config.output_dir)
    marker = folder / "unit.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    began = time.perf_counter()
    recipe = registry.recipe(unit.kind).train()
    started = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    recipe(dataclasses.replace(unit.config, resume=started))  # a killed unit continues from its newest checkpoint
    info = {"unit": unit.name, "kind": unit.kind, "seed": unit.seed, "key": unit.key, "after": unit.after,
            "seconds": round(time.perf_counter() - began, 2)}
    if is_main_process():
        write_json(marker, info)
    return info


def evaluate_model(job: Evaluation) -> dict:
    """The evaluation of one model folder (module docstring, step 3) into job.output/result.json; resumable."""
    from medsynapse.data.sources import load_source
    from medsynapse.eval.runner import PREDICTIONS, EvalSettings, evaluate_benchmarks, latest_per_id, read_predictions
    from medsynapse.model.medsynapse import MedSynapseV

    out = Path(job.output)
    result_path = out / "result.json"
    if result_path.is_file():
        result: dict = json.loads(result_path.read_text())
        if result.get("settings") == json.loads(json.dumps(job.settings())):
            return result
    began = time.perf_counter()
    answer_format = job.answer_format or _answer_format(job.model)
    settings = EvalSettings(batch_size=job.eval_batch_size,
                            max_new_tokens=job.reasoning_tokens if answer_format == "reasoning" else job.max_new_tokens,
                            answer_format=answer_format if job.answer_format else None, engine=job.engine,
                            limit=job.limit)
    harness = out / f"harness-{_key(asdict(settings))[:8]}"  # other settings, another folder (never refused)
    metrics = evaluate_benchmarks(job.model, job.benchmarks, job.data_root, harness, settings)
    if not is_main_process():  # under torchrun: the harness shared the questions; the main process reports
        return _result_when_written(result_path, job)
    correct = {}
    for bench in job.benchmarks:
        for line in latest_per_id(read_predictions(harness / bench / PREDICTIONS)):
            if "skipped" not in line and line.get("correct") is not None:
                correct[f"{bench}/{line['id']}"] = int(bool(line["correct"]))
    write_json(out / "correct.json", correct)
    per_bench = {b: {k: m.get(k) for k in ("accuracy", "n", "unparseable", "by_question_type", "n_skipped")}
                 for b, m in metrics.items()}
    accuracies = [m["accuracy"] for m in per_bench.values() if m["accuracy"] is not None]
    result = {"model": job.name, "answer_format": answer_format, "harness": harness.name,
              "accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
              "by_question_type": _pooled_types(per_bench), "benchmarks": per_bench,
              "efficiency": {"harness": {b: {k: m.get("efficiency", {}).get(k)
                                             for k in ("ms_per_sample", "peak_mem_mb", "batch_size")}
                                         for b, m in metrics.items()}}}
    first = load_source(job.benchmarks[0], job.data_root, out / ".images")
    samples = first.samples[: job.reliance_limit] if job.reliance_limit else first.samples
    if _has_memory(job.model) and job.reliance_conditions:
        import torch

        from medsynapse.eval.diagnostics import reliance_report

        model = MedSynapseV.from_pretrained(job.model, merge_adapter=True)  # after the harness freed its copy
        if torch.cuda.is_available():
            model.to("cuda")
        reliance = reliance_report(model, samples, batch_size=job.eval_batch_size,
                                   intervention=job.counterfactual, conditions=job.reliance_conditions,
                                   max_new_tokens=settings.max_new_tokens or first.max_new_tokens)
        reliance.pop("by_question_type", None)
        if reliance.get("collapse_cosine") is not None:  # a float sum: its last digits follow the thread count
            reliance["collapse_cosine"] = round(reliance["collapse_cosine"], 6)
        result["reliance"] = reliance
        if reliance.get("counterfactual") is not None:
            result["counterfactual_accuracy"] = reliance["counterfactual"]
            result["counterfactual_sensitivity"] = reliance["as_is"] - reliance["counterfactual"]
    result["wall_s"] = round(time.perf_counter() - began, 2)
    result["settings"] = job.settings()
    write_json(result_path, result)
    return result


def _result_when_written(path: Path, job: Evaluation) -> dict:
    """A process other than the main one waits for the main process's result.json of this evaluation (its reliance
    report runs there alone) by watching the file, not at a collective, whose timeout (NCCL's 10 min) a long report
    could pass. torchrun stops every process when one fails, so the wait cannot outlive the main process."""
    wanted = json.loads(json.dumps(job.settings()))
    while True:
        if path.is_file():
            result: dict = json.loads(path.read_text())
            if result.get("settings") == wanted:
                return result
        time.sleep(1.0)


def _has_memory(folder: str) -> bool:
    """A P_phi or A_psi memory (a latent-reasoning baseline's thoughts are not memory to test)."""
    from medsynapse.model.medsynapse import MANIFEST

    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return False
    values = json.loads(manifest.read_text())
    return bool(values.get("sampler") or values.get("autonomous")) and not values.get("latent")


def _answer_format(folder: str) -> str:
    """The format a folder's model was trained to reply in (its manifest; a plain VLM answers directly)."""
    from medsynapse.model.medsynapse import MANIFEST

    manifest = Path(folder) / MANIFEST
    return json.loads(manifest.read_text()).get("answer_format") or "direct" if manifest.is_file() else "direct"


def _pooled_types(per_bench: dict) -> dict:
    """Accuracy per question type over every benchmark (weighted by questions)."""
    pooled: dict[str, list[float]] = {}
    for metrics in per_bench.values():
        for qtype, value in (metrics.get("by_question_type") or {}).items():
            right, n = pooled.get(qtype, [0.0, 0])
            pooled[qtype] = [right + value["accuracy"] * value["n"], n + value["n"]]
    return {t: {"accuracy": right / n, "n": n} for t, (right, n) in sorted(pooled.items()) if n}


def _worker_init(threads: int, devices: Any = None) -> None:
    """A worker dies with the study (no orphan keeps training after a kill), uses its share of the cores and, on a
    machine with GPUs, one GPU of its own (taken from the `devices` queue before CUDA starts in this process)."""
    import contextlib
    import ctypes
    import signal

    import torch

    with contextlib.suppress(OSError):  # Linux; elsewhere a killed study's workers finish their job
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())


# --- running -----------------------------------------------------------------------------------------------------


def processes() -> Any:
    """accelerate's PartialState when launched as several processes (torchrun, accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    state = processes()
    return state is None or state.is_main_process


def run_study(study: StudyConfig, raw: dict, source: str, train_only: bool = False) -> dict:
    """The plan of the module docstring; returns study.json's content. `train_only`: the units, no evaluation or
    report (returns {"units": {name: unit.json}}). Under torchrun every process runs each job together, in order
    (a unit's training and an evaluation's harness share the work through accelerate); the main process prepares
    first, writes every record and the reports; the others return {} once the jobs are done."""
    began = time.perf_counter()
    output = Path(study.output)
    state = processes()
    if state is not None and (study.workers != 1 or study.launcher != "local"):
        raise ConfigError(f"study: under torchrun ({state.num_processes} processes) the processes run each job "
                          f"together: workers 1 and launcher local, not {study.workers} / {study.launcher}")
    check_rows(study, raw, source, "study", memory=True)  # the memory bound of every row, before anything is built
    check_plan(study, raw, source)
    output.mkdir(parents=True, exist_ok=True)
    with _main_process_first(state):  # the others find the shared folders built (cached) and the record kept
        shared, eval_source, shared_report = prepare(study, raw, source)
    plan = plan_study(study, raw, source, shared, eval_source, output)
    if train_only:
        plan = Plan(plan.units, {}, {})
    run_jobs(plan, study.workers, study.launcher, study.cluster, output / "submitit", state)
    if state is not None and not state.is_main_process:
        return {}
    if train_only:
        return {"units": {name: json.loads((Path(unit.config.output_dir) / "unit.json").read_text())
                          for name, unit in plan.units.items()}}
    cells = write_cells(plan, output)
    efficiency = measure_rows(study, plan, output)
    result = summarize(study, plan, cells, efficiency, shared_report, round(time.perf_counter() - began, 2))
    write_reports(result, output)
    return result


def _main_process_first(state: Any) -> Any:
    import contextlib

    return contextlib.nullcontext() if state is None else state.main_process_first()


def prepare(study: StudyConfig, raw: dict, source: str, until: str = "cache") -> tuple[Any, tuple[list[str], str],
                                                                                        dict]:
    """Step 1: SynthMed's shared folders (cached), or for a real run its convert and cache steps (steps/prepare.py,
    `until` the last of them)."""
    run = run_config_from(raw, source)
    if run.synthmed:
        from medsynapse.recipes.priors import cache_features
        from medsynapse.steps.synthmed import token_readability

        shareds = synthmed_shareds(study, raw, source, build=True)
        for shared in shareds.values():
            if not run.data.prior_cache:  # filled here, once, before any worker reads it
                cache_features(str(shared.encoder), shared.train_file, str(shared_prior_cache(shared)))
        first = next(iter(shareds.values()))
        eval_source = (study.benchmarks or ["synthmed"], study.data_root or str(first.data))
        report: dict[str, Any] = {"synthmed": True, "timing_s": first.timing, "data": str(first.data),
                                  "vlm": str(first.vlm_base), "encoder": str(first.encoder)}
        if len(shareds) > 1 or study.token_readability:  # the rows' base VLMs (one study's usual single one: above)
            report["levels"] = {
                key: {"vlm": str(shareds[key].vlm_base), "encoder": str(shareds[key].encoder), "rows": rows,
                      "timing_s": shareds[key].timing,
                      **({"token_readability": token_readability(shareds[key])} if study.token_readability else {})}
                for key, rows in row_levels(study, raw, source, shareds).items()}
        return shareds, eval_source, report
    from medsynapse.steps.prepare import prepare_run

    record = prepare_run(run, until)
    return None, _eval_source(study, run), {"synthmed": False, "prepare": record.get("steps", {})}


def _eval_source(study: StudyConfig, run: RunConfig) -> tuple[list[str], str]:
    """The benchmarks and data root a real run's rows are scored on: the study's, else the run file's `eval`."""
    return study.benchmarks or list(run.eval.benchmarks), study.data_root or run.eval.data_root


def run_jobs(plan: Plan, workers: int, launcher: str = "local", cluster: dict | None = None,
             folder: Path | None = None, state: Any = None) -> None:
    """Every unit, then every evaluation, in dependency order; `workers` at once, on this machine's processes or as
    submitit jobs (launch.py). Progress and ETA per job. `state` (torchrun): every process runs each job, starting
    it together (what a job finds finished, the main process's record, is then the same for all)."""
    if state is not None:
        state.wait_for_everyone()
    jobs: dict[str, tuple[Any, Any, str | None]] = {}
    for name, unit in plan.units.items():
        jobs[f"train {name}"] = (train_unit, unit, f"train {unit.after}" if unit.after else None)
    for name, evaluation in plan.evaluations.items():
        jobs[f"eval {name}"] = (evaluate_model, evaluation,
                                f"train {evaluation.after}" if evaluation.after else None)
    done = {name for name, (fn, job, _) in jobs.items() if _finished(fn, job)}
    seconds: dict[str, list[float]]  # per kind of job, the times of those done (_finish)
    total, seconds = len(jobs), {"train": [], "eval": []}
    print(f"study: {total} jobs ({len(plan.units)} trainings, {len(plan.evaluations)} evaluations, "
          f"{len(plan.cells)} cells); {len(done)} already finished", flush=True)
    waiting_on = _waiting_on(jobs)
    pending = sorted((name for name in jobs if name not in done), key=lambda n: -waiting_on[n])  # stable: plan order
    pool: Any = None
    if launcher != "local":
        from medsynapse.launch import SubmititPool, make_executor

        executor = make_executor(launcher, folder or Path("submitit"), cluster or {})
        local_threads = max(1, (os.cpu_count() or 1) // workers) if launcher == "submitit-local" else None
        pool = SubmititPool(executor, local_threads)
    elif workers > 1:
        import multiprocessing

        import torch

        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        devices = None
        if torch.cuda.is_available():  # one GPU per worker
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            if len(ids) < workers:
                raise ValueError(f"workers: {workers} workers need {workers} GPUs, this machine shows {len(ids)}")
            devices = context.Queue()
            for device in ids[:workers]:
                devices.put(device)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                   initargs=(threads, devices))
    running: dict[Future, tuple[str, float]] = {}
    try:
        while pending or running:
            ready = [n for n in pending if jobs[n][2] is None or jobs[n][2] in done]
            if not ready and not running:
                raise RuntimeError(f"study: jobs waiting on jobs that do not exist: {pending[:3]}")
            while ready and len(running) < workers:
                name = ready.pop(0)
                pending.remove(name)
                fn, job, _ = jobs[name]
                print(f"study: [{len(done) + len(running) + 1}/{total}] {name} ...", flush=True)
                if pool is None:
                    start = time.perf_counter()
                    if state is not None:
                        state.wait_for_everyone()
                    fn(job)
                    _finish(name, start, done, seconds, total, pending, workers)
                else:
                    running[pool.submit(fn, job)] = (name, time.perf_counter())
            if running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    name, start = running.pop(future)
                    future.result()  # a failed job stops the study (its error, one line in the CLI)
                    _finish(name, start, done, seconds, total, pending + [n for n, _ in running.values()],
                            workers)
    except BaseException:
        if isinstance(pool, ProcessPoolExecutor):  # a failed job (or Ctrl-C) stops the others now, not when their
            for process in list(getattr(pool, "_processes", {}).values()):  # training ends
                process.terminate()
        elif pool is not None:
            pool.cancel_all()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _waiting_on(jobs: dict[str, tuple[Any, Any, str | None]]) -> dict[str, int]:
    """How many jobs wait, directly or not, on each job (a Stage I: its Stage IIs, their Stage IIIs and evaluations)."""
    count = dict.fromkeys(jobs, 0)
    for name in jobs:
        parent = jobs[name][2]
        while parent is not None:
            count[parent] += 1
            parent = jobs[parent][2]
    return count


def _finished(fn: Any, job: Any) -> bool:
    if fn is train_unit:
        return (Path(job.config.output_dir) / "unit.json").is_file()
    path = Path(job.output) / "result.json"
    return path.is_file() and json.loads(path.read_text()).get("settings") == json.loads(json.dumps(job.settings()))


def _finish(name: str, start: float, done: set, seconds: dict[str, list[float]], total: int, left: list[str],
            workers: int) -> None:
    """Progress line; the ETA from the mean time of each kind of job done so far ("train stage2", "eval sft", ...;
    a kind not seen yet: the mean of its trainings or evaluations, else of everything). One mean over all trainings
    would price a 60-s SFT like a 200-s Stage II."""
    took = time.perf_counter() - start
    done.add(name)
    for key in (_job_kind(name), name.split()[0]):
        seconds.setdefault(key, []).append(took)
    mean = {kind: sum(v) / len(v) for kind, v in seconds.items() if v}
    overall = sum(sum(v) for v in seconds.values() if v) / max(1, sum(len(v) for v in seconds.values()))
    eta = sum(mean.get(_job_kind(job), mean.get(job.split()[0], overall)) for job in left) / workers
    print(f"study: {name} finished in {took:.0f} s; {len(done)}/{total} done, ETA {eta / 60:.0f} min", flush=True)


def _job_kind(name: str) -> str:
    """'train stage2-s0-132d90d27c89' -> 'train stage2'; 'eval ivt_lr-s1-…' -> 'eval ivt_lr'; 'eval base'."""
    action, _, unit = name.partition(" ")
    return f"{action} {unit.split('-')[0]}"


def measure_rows(study: StudyConfig, plan: Plan, output: Path) -> dict[str, dict]:
    """Batch-1 latency and peak memory per row (the model of its first seed), each in a fresh process, one row after
    another once every job is done (nothing else competes for the cores; timing a model beside a training job is
    noise). Each answer stops at its end of sequence within the row's budget (the benchmark's for a direct reply,
    `reasoning_tokens` for a reasoning one): what a user waits for. Kept in efficiency.json per row while the row's
    model and these settings are the same (a kill loses at most the row being timed)."""
    from medsynapse.data.schema import write_samples
    from medsynapse.data.sources import load_source
    from medsynapse.eval.efficiency import measure_isolated
    from medsynapse.eval.runner import REASONING_BUDGET

    if not study.latency_samples:
        return {}
    path = output / "efficiency.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    first = next(iter(plan.evaluations.values()))
    benchmark = load_source(first.benchmarks[0], first.data_root, output / "efficiency" / ".images")
    timed = benchmark.samples[: study.latency_samples + 3]
    questions = output / "efficiency" / "questions.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    write_samples(questions, timed)
    rows: dict[str, dict] = {}
    for name in study.rows:
        if study.rows[name].answer_format:  # the same folder as its as-trained row: timed there
            continue
        evaluation = plan.evaluations[plan.cells[(name, study.seeds[0])]["evaluation"]]
        result = json.loads((Path(evaluation.output) / "result.json").read_text())
        reasoning = result["answer_format"] == "reasoning"
        budget = ((study.reasoning_tokens or REASONING_BUDGET) if reasoning else study.max_new_tokens
                  or benchmark.max_new_tokens)
        settings = {"model": evaluation.name, "questions": [s.id for s in timed], "max_new_tokens": budget}
        if kept.get(name, {}).get("settings") == settings:
            rows[name] = kept[name]
            continue
        print(f"study: timing {name} ({evaluation.name}), batch 1, {len(timed) - 3} questions", flush=True)
        measured = measure_isolated(evaluation.model, str(questions), [s.id for s in timed], n_timed=len(timed) - 3,
                                    max_new_tokens=budget, fixed_length=False)
        rows[name] = {**measured, "settings": settings}
        write_json(path, {**kept, **rows})
    return rows


def write_cells(plan: Plan, output: Path) -> dict[tuple[str, int], dict]:
    """Step 4: one file per (row, seed), written once (a cell with the same hash is kept as it is)."""
    cells = {}
    for (row, seed), cell in plan.cells.items():
        path = output / "cells" / row / f"seed_{seed}.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("hash") == cell["hash"]:
                cells[(row, seed)] = old
                continue
        evaluation = json.loads((Path(plan.evaluations[cell["evaluation"]].output) / "result.json").read_text())
        trained = [json.loads((Path(plan.units[u].config.output_dir) / "unit.json").read_text())
                   for u in cell["units"]]
        value = {"row": row, "seed": seed, **cell, **{k: v for k, v in evaluation.items() if k != "settings"},
                 "train_s": {t["unit"]: t["seconds"] for t in trained},
                 "eval_s": evaluation.get("wall_s")}
        value.pop("wall_s", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, value)
        cells[(row, seed)] = value
    return cells


# --- summary and reports -----------------------------------------------------------------------------------------


def _correct(plan: Plan, evaluation: str) -> dict[str, int]:
    return json.loads((Path(plan.evaluations[evaluation].output) / "correct.json").read_text())


def summarize(study: StudyConfig, plan: Plan, cells: dict, efficiency: dict, shared: dict, wall_s: float) -> dict:
    """Per row: its cells, mean ± sd [95 % t-interval] of every number shared by its seeds, its answer format, and
    the paired comparison against its reference row (eval/stats.compare: hierarchical bootstrap over seeds and
    questions, seed-level t, question-only bootstrap), p-values adjusted over each table (group) by
    `study.correction`; the data parity table."""
    rows: dict[str, dict[str, Any]] = {}
    for name, spec in study.rows.items():
        per_seed = [cells[(name, seed)] for seed in study.seeds]
        numbers = {"accuracy": [c["accuracy"] for c in per_seed]}
        for key in ("counterfactual_accuracy", "counterfactual_sensitivity"):
            if all(c.get(key) is not None for c in per_seed):
                numbers[key] = [c[key] for c in per_seed]
        types = sorted({t for c in per_seed for t in c["by_question_type"]})
        formats = sorted({c.get("answer_format") or "direct" for c in per_seed})
        rows[name] = {"label": spec.label or name, "group": spec.group, "model": spec.model, "method": spec.method,
                      "set": spec.set, "reference": _reference(study, name), "answer_format": "/".join(formats),
                      "summary": {k: mean_sd_ci(v) for k, v in numbers.items()},
                      "efficiency": {k: v for k, v in efficiency.get(name, {}).items() if k != "settings"},
                      "by_question_type": {t: mean_sd_ci([c["by_question_type"][t]["accuracy"] for c in per_seed
                                                          if t in c["by_question_type"]]) for t in types},
                      "cells": {str(c["seed"]): c for c in per_seed}}
        benchmarks = list(per_seed[0].get("benchmarks") or {})
        if len(benchmarks) > 1:  # Table 1's columns (one benchmark: the accuracy above is its own)
            scored = {b: [c["benchmarks"][b]["accuracy"] for c in per_seed if c["benchmarks"][b]["accuracy"]
                          is not None] for b in benchmarks}  # None: nothing scored (every question skipped)
            rows[name]["by_benchmark"] = {b: mean_sd_ci(v) if v else None for b, v in scored.items()}
        if spec.series:
            rows[name]["series"] = spec.series
    for name, row in rows.items():
        reference = row["reference"]
        if reference is None:
            continue
        mine = [_correct(plan, cells[(name, s)]["evaluation"]) for s in study.seeds]
        theirs = [_correct(plan, cells[(reference, s)]["evaluation"]) for s in study.seeds]
        questions = sorted(set.intersection(*(set(c) for c in mine + theirs)))
        row["comparison"] = compare([[c[q] for q in questions] for c in mine],
                                    [[c[q] for q in questions] for c in theirs],
                                    study.bootstrap_resamples, study.bootstrap_seed,
                                    groups=[q.split("/", 1)[0] for q in questions])
    for group in dict.fromkeys(row["group"] for row in rows.values()):
        adjust_family({n: r["comparison"] for n, r in rows.items() if r["group"] == group and "comparison" in r},
                      study.correction)
    shared_units = {}
    for name in plan.units:
        users = sorted({row for (row, _), cell in plan.cells.items() if name in cell["units"]})
        if len(users) > 1:
            shared_units[name] = users
    trained_s = sum(json.loads((Path(u.config.output_dir) / "unit.json").read_text())["seconds"]
                    for u in plan.units.values())
    return {"study": {k: v for k, v in asdict(study).items() if k != "rows"}, "seeds": study.seeds,
            "shared": shared, "rows": rows, "parity": parity_table(study, plan),
            "units": {"count": len(plan.units), "evaluations": len(plan.evaluations), "cells": len(plan.cells),
                      "shared_by_rows": shared_units},
            "timing_s": {"wall": wall_s, "training_sum": round(trained_s, 2)}}


def _reference(study: StudyConfig, row: str) -> str | None:
    reference = study.rows[row].reference or study.reference
    if reference == "none" or reference == row or reference not in study.rows:
        return None
    return reference


def _stat(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "—"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _interval(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("ci95") is None:
        return "—"
    low, high = stat["ci95"]
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table_rows(result: dict) -> list[dict]:
    """One flat record per row: the columns of table.md and table.csv."""
    out = []
    for name, row in result["rows"].items():
        summary, test = row["summary"], row.get("comparison")
        seed_t = (test or {}).get("seed_t") or {}
        out.append({"group": row["group"], "row": row["label"], "key": name, "answer_format": row["answer_format"],
                    "accuracy_mean": summary["accuracy"]["mean"], "accuracy_sd": summary["accuracy"]["sd"],
                    "accuracy_ci95": summary["accuracy"]["ci95"],
                    "counterfactual_sensitivity": (summary.get("counterfactual_sensitivity") or {}).get("mean"),
                    "ms_per_sample": row["efficiency"].get("ms_per_sample"),
                    "peak_mem_mb": row["efficiency"].get("peak_mem_mb"),
                    "reference": row["reference"], "delta": test["delta"] if test else None,
                    "delta_ci95": test["ci95"] if test else None, "p_value": test["p_value"] if test else None,
                    "p_adjusted": test.get("p_adjusted") if test else None,
                    "delta_seed_t_ci95": seed_t.get("ci95"), "p_seed_t": seed_t.get("p_value"),
                    "delta_questions_only_ci95": test["questions_only"]["ci95"] if test else None,
                    "seeds": len(row["cells"])})
    return out


def markdown_table(result: dict) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    resamples = result["study"]["bootstrap_resamples"]
    correction = {"holm": "Holm's step-down (family-wise error)", "bh": "Benjamini-Hochberg (false discovery rate)"}[
        result["study"].get("correction", "holm")]
    lines = [f"Accuracy: mean ± sd over seeds {seeds} [95 % t-interval of the mean over seeds]. Format: the answer "
             "format the row is scored in (as it was trained; the base in both). Δ: accuracy minus the reference "
             f"row's, paired. Δ's interval and p: the hierarchical bootstrap ({resamples} resamples; each draws the "
             "training seeds with replacement and each benchmark's questions with replacement), so both seed and "
             f"question variance are in it. p adj.: {correction} over the comparisons of the same table. Seed t: "
             "the per-seed differences' Student-t interval and p (S − 1 degrees of freedom); with 3 seeds it is "
             "wide, and the bootstrap narrow by about sqrt(2/3): read both. A(M) − A(M'): accuracy with the memory "
             "minus with the counterfactual memory. ms/sample: batch 1, the first seed's model alone in a fresh "
             "process, each answer until its end of sequence (a reasoning row writes its analysis first)."]
    group = None
    for record in table_rows(result):
        if record["group"] != group:
            group = record["group"]
            lines += ["", f"**{group}**", "", "| row | format | accuracy | 95 % interval | vs | Δ [95 % interval] | "
                      "p | p adj. | seed t: Δ 95 % | p | A(M) − A(M') | ms / sample |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        row = result["rows"][record["key"]]
        delta = (f"{record['delta']:+.3f} {format_interval(record['delta_ci95'])}" if record["delta"] is not None
                 else "—")
        versus = result["rows"][record["reference"]]["label"] if record["reference"] else "—"
        lines.append(f"| {record['row']} | {record['answer_format']} | {_stat(row['summary']['accuracy'])} | "
                     f"{_interval(row['summary']['accuracy'])} | {versus} | {delta} | "
                     f"{format_p(record['p_value'])} | {format_p(record['p_adjusted'])} | "
                     f"{format_interval(record['delta_seed_t_ci95'])} | {format_p(record['p_seed_t'])} | "
                     f"{_stat(row['summary'].get('counterfactual_sensitivity'))} | "
                     f"{_ms(record['ms_per_sample'])} |")
    if any(row.get("by_benchmark") for row in result["rows"].values()):
        lines += ["", breakdown_markdown(result, "by_benchmark", "benchmark")]
    lines += ["", question_type_markdown(result)]
    if result.get("parity"):
        lines += ["", parity_markdown(result["parity"])]
    return "\n".join(lines) + "\n"


def question_type_markdown(result: dict) -> str:
    """Accuracy per question type, a row per study row (mean ± sd over its seeds; — where a row has no question
    of that type): where each row's gain or loss lies."""
    return breakdown_markdown(result, "by_question_type", "question type", sort=True)


def breakdown_markdown(result: dict, key: str, what: str, sort: bool = False) -> str:
    """Accuracy per `what` (a row's `key`: by_question_type, by_benchmark), a line per study row (mean ± sd over its
    seeds; — where a row has none of that kind)."""
    rows = result["rows"]
    columns = list(dict.fromkeys(c for row in rows.values() for c in row.get(key) or {}))
    columns = sorted(columns) if sort else columns
    lines = [f"**Accuracy per {what}** (mean ± sd over seeds)", "",
             "| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows.values():
        cells = [_stat((row.get(key) or {}).get(c), digits=2) for c in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(result: dict) -> str:
    records = table_rows(result)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()})
    return buffer.getvalue()


def plot_study(result: dict, output: Path) -> None:
    """accuracy.png: every row with its 95 % interval; efficiency.png: accuracy against batch-1 ms/sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = table_rows(result)
    names = [r["row"] for r in records]
    means = [r["accuracy_mean"] for r in records]
    errors = [[m - r["accuracy_ci95"][0] if r["accuracy_ci95"] else 0 for m, r in zip(means, records)],
              [r["accuracy_ci95"][1] - m if r["accuracy_ci95"] else 0 for m, r in zip(means, records)]]
    figure, axis = plt.subplots(figsize=(7, 0.32 * len(records) + 1.2))
    axis.barh(range(len(records)), means, xerr=errors, color="#4c72b0", capsize=2)
    axis.set_yticks(range(len(records)), names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("accuracy (mean over seeds, 95 % interval)")
    figure.tight_layout()
    figure.savefig(output / "accuracy.png", dpi=120)
    plt.close(figure)
    timed = [r for r in records if r["ms_per_sample"] is not None]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for record in timed:
        axis.scatter(record["ms_per_sample"], record["accuracy_mean"],
                     color="#c44e52" if record["group"] == "Table 1" else "#8c8c8c")
        axis.annotate(record["row"], (record["ms_per_sample"], record["accuracy_mean"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("ms / sample (batch 1)")
    axis.set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(output / "efficiency.png", dpi=120)
    plt.close(figure)


def visibility_points(result: dict) -> list[dict]:
    """Per row with a `series` whose base VLM's token readability was measured (`token_readability`): its series,
    that readability (the probe's accuracy and Wilson interval), and the row's accuracy overall and on presence
    questions (mean ± sd [95 % t-interval] over seeds); by series, then readability."""
    levels = (result.get("shared") or {}).get("levels") or {}
    level_of = {row: level for level in levels.values() for row in level["rows"]}
    points = []
    for name, row in result["rows"].items():
        level = level_of.get(name) or {}
        if not row.get("series") or "token_readability" not in level:
            continue
        readability = level["token_readability"]
        points.append({"series": row["series"], "row": name, "label": row["label"],
                       "readability": readability["accuracy"], "readability_ci95": readability["ci95"],
                       "majority": readability.get("chance"), "accuracy": row["summary"]["accuracy"],
                       "presence": (row.get("by_question_type") or {}).get("presence")})
    return sorted(points, key=lambda p: (p["series"], p["readability"]))


def visibility_markdown(points: list[dict]) -> str:
    """The visibility table: per series and level, the VLM tokens' readability and the row's accuracies."""
    lines = ["**Accuracy against the visibility of the lesion evidence to the VLM** (readability: a linear probe of "
             "lesion presence on the base VLM's merged visual tokens, test images, 95 % Wilson interval; accuracy: "
             "mean ± sd [95 % t-interval] over seeds)", "",
             "| series | row | token readability | accuracy | presence accuracy |", "|---|---|---|---|---|"]
    for p in points:
        low, high = p["readability_ci95"]
        lines.append(f"| {p['series']} | {p['label']} | {p['readability']:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{_with_interval(p['accuracy'])} | {_with_interval(p['presence'], 2)} |")
    return "\n".join(lines)


def _with_interval(stat: dict | None, digits: int = 3) -> str:
    return "—" if not stat else f"{_stat(stat, digits)} {_interval(stat, digits)}".replace(" —", "")


def plot_visibility(points: list[dict], output: Path) -> None:
    """visibility.png: accuracy (left) and presence accuracy (right) against the token readability, one line per
    series, each point with its 95 % interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for series in dict.fromkeys(p["series"] for p in points):
        mine = [p for p in points if p["series"] == series]
        x = [p["readability"] for p in mine]
        for axis, key in zip(axes, ("accuracy", "presence")):
            stats = [p[key] for p in mine]
            if any(s is None for s in stats):
                continue
            means = [s["mean"] for s in stats]
            errors = [[m - (s["ci95"] or [m, m])[0] for m, s in zip(means, stats)],
                      [(s["ci95"] or [m, m])[1] - m for m, s in zip(means, stats)]]
            axis.errorbar(x, means, yerr=errors, marker="o", capsize=3, label=series)
    for axis, title in zip(axes, ("accuracy (all lesion questions)", "presence accuracy")):
        axis.set_xlabel("lesion presence read from the VLM's visual tokens (linear probe)")
        axis.set_title(title, fontsize=10)
    axes[0].set_ylabel("accuracy (mean over seeds, 95 % interval)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "visibility.png", dpi=120)
    plt.close(figure)


def write_reports(result: dict, output: Path) -> None:
    write_json(output / "study.json", result)
    table = markdown_table(result)
    points = visibility_points(result)
    if points:
        table += "\n" + visibility_markdown(points) + "\n"
        plot_visibility(points, output)
    write_text_atomic(output / "table.md", table)
    write_text_atomic(output / "table.csv", csv_table(result))
    plot_study(result, output)
