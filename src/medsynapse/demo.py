"""`medsynapse demo --config configs/synthmed.yaml`: the whole pipeline on SynthMed, on a laptop CPU.

The run file's `model`, `data` and `stage1-3` sections train Stages I-III through the same chain of steps
(steps/chain.py, `medsynapse pipeline`) that a paper-scale run uses; its `synthmed` section (DemoConfig) drives the
SynthMed-only steps around it.

Shared by every seed (steps/synthmed.py, cached, keyed by the settings that shape them): data -> tiny Qwen3-VL
(built offline) -> base-VLM preparation -> prior encoder (trained on masks, frozen).
Per training seed: Stage I -> Stage II -> Stage III (the pipeline: kept when finished with the same settings, resumed
from its checkpoints when killed, redone when the settings changed); the no-memory controls (SFT, GRPO-only) on the
same questions and budgets; optional ablations (Stage II rewards from the same Stage I, the JSD-only student from the
same Stage II); evaluation of every row on the
held-out lesion questions (Stage I/II rows also with the counterfactual memory M'); the memory-reliance report, leak
and readability probes; latency and memory of base vs teacher vs encoder-free student.
Several seeds: one folder per seed (a finished seed is reused) and a summary with mean ± sd and 95 % intervals.
OUTPUT/run.yaml: the same Stage I-III settings as a run file (runconfig.py) naming the cached folders.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from medsynapse.data.schema import read_samples
from medsynapse.eval.diagnostics import leak_probe, readability_probes, reliance_report
from medsynapse.eval.efficiency import compare_latency, measure_isolated
from medsynapse.eval.report import (
    diagnostics_tables,
    efficiency_table,
    plot_accuracy,
    stage_table,
    summarize_seeds,
    summary_report,
    type_table,
    write_json,
)
from medsynapse.eval.vqa import evaluate
from medsynapse.locking import write_text_atomic
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.recipes.sft import train_sft
from medsynapse.recipes.stage2_ccr import train_stage2
from medsynapse.recipes.stage3_imt import train_stage3
from medsynapse.runconfig import RunConfig, resolve, resolve_baseline
from medsynapse.steps.chain import run_pipeline
from medsynapse.steps.synthmed import (
    DemoConfig,
    Shared,
    ablation_config,
    check_settings,
    demo_settings,
    prepare_shared,
    seed_run,
    stopwatch,
)


def _fresh(folder: Path) -> str:
    shutil.rmtree(folder, ignore_errors=True)
    return str(folder)


def _variant(run: RunConfig, stage: str, name: str, overrides: list[str], output_dir: Path):
    """An ablation's resolved config (steps/synthmed.ablation_config), trained into `output_dir` (emptied)."""
    return replace(ablation_config(run, stage, name, overrides), output_dir=_fresh(output_dir))


def run_seed(config: DemoConfig, run: RunConfig, shared: Shared, seed: int, out: Path) -> dict:
    """One seed: Stage I -> II -> III (the pipeline), the controls and ablations, evaluation, diagnostics,
    efficiency, reports."""
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    timed = stopwatch(timing)
    out.mkdir(parents=True, exist_ok=True)
    test = shared.test
    run = seed_run(run, shared, seed, out)
    intervention = resolve(run, "stage2").intervention

    manifest = run_pipeline(run, until="stage3", on_changed="redo")
    timing.update({step: manifest["steps"][step]["seconds"] for step in ("stage1", "stage2", "stage3")})
    stage1_dir, stage2_dir, stage3_dir = (Path(resolve(run, s).output_dir) for s in ("stage1", "stage2", "stage3"))
    control_dirs: dict[str, Path] = {}
    if config.controls:
        for method in ("sft", "grpo"):
            control = resolve_baseline(run, method)
            _fresh(Path(control.output_dir))
            name = Path(control.output_dir).name  # sft, grpo_only
            control_dirs[name] = Path(control.output_dir)
            train = train_sft if method == "sft" else train_stage2
            timed(name, lambda train=train, control=control: train(control))
    ablation_dirs: dict[str, Path] = {}
    if config.ablations:
        for name, overrides in config.stage2_ablations.items():
            ablation_dirs[name] = out / name
            timed(name, lambda n=name, o=overrides: train_stage2(_variant(run, "stage2", n, o, ablation_dirs[n])))
        for name, overrides in config.stage3_ablations.items():
            ablation_dirs[name] = out / name
            timed(name, lambda n=name, o=overrides: train_stage3(_variant(run, "stage3", n, o, ablation_dirs[n])))

    evaluations: dict[str, dict] = {}

    def evaluate_stage(name: str, folder: Path, counterfactual: bool) -> dict:
        model = MedSynapseV.from_pretrained(folder, merge_adapter=True)
        result = timed(f"eval_{name}", lambda: evaluate(model, test, batch_size=config.eval_batch_size,
                                                        desc=f"eval {name}"))
        evaluations[name] = result
        row = {"accuracy": result["accuracy"], "n": result["n"], "unparseable": result["unparseable"],
               "by_question_type": result["by_question_type"]}
        if counterfactual:
            cf = timed(f"eval_{name}_cf", lambda: evaluate(model, test, branch="counterfactual",
                                                           intervention=intervention,
                                                           batch_size=config.eval_batch_size, desc=f"eval {name} cf"))
            evaluations[f"{name}_counterfactual"] = cf
            row["counterfactual_accuracy"] = cf["accuracy"]
            row["counterfactual_sensitivity"] = result["accuracy"] - cf["accuracy"]
            row["counterfactual_by_question_type"] = cf["by_question_type"]
        return row

    stages = {"base": evaluate_stage("base", shared.vlm_base, False)}
    for name, folder in control_dirs.items():
        stages[name] = evaluate_stage(name, folder, False)
    stages["stage1"] = evaluate_stage("stage1", stage1_dir, True)
    stages["stage2"] = evaluate_stage("stage2", stage2_dir, True)
    for name, folder in ablation_dirs.items():
        if name in config.stage3_ablations:
            stages[name] = evaluate_stage(name, folder, False)
            continue
        stages[name] = evaluate_stage(name, folder, True)
        stages[name].update(_causal_summary(folder))
    # The Stage III teacher is the Stage II model with its privileged memory: same weights, same answers.
    stages["stage3_teacher"] = {k: stages["stage2"][k] for k in ("accuracy", "n", "unparseable", "by_question_type")}
    stages["stage3_student"] = evaluate_stage("stage3_student", stage3_dir, False)
    stages["stage2"].update(_causal_summary(stage2_dir))

    diagnostics = {}
    if config.diagnostics:
        diagnostics = timed("diagnostics", lambda: run_diagnostics(
            {"stage1": stage1_dir, "stage2": stage2_dir, "stage3_student": stage3_dir}, shared, intervention,
            config.eval_batch_size))

    # Latency side by side in one process; memory of each model in a fresh process (clean peak). 0 samples: none.
    folders = {"base": shared.vlm_base, "stage3_teacher": stage2_dir, "stage3_student": stage3_dir}
    timed_ids = [s.id for s in test[:config.efficiency_samples + 3]]
    # (mypy cannot infer a lambda whose default argument binds the loop variable: "Cannot infer type")
    latency = timed("efficiency_latency", lambda: compare_latency(
        {name: (lambda f=f: MedSynapseV.from_pretrained(f, merge_adapter=True)) for name, f in folders.items()},  # type: ignore[misc]
        test, n_timed=config.efficiency_samples)) if config.efficiency_samples else {}
    efficiency = {}
    for name, folder in folders.items() if config.efficiency_samples else ():
        isolated = timed(f"efficiency_memory_{name}", lambda f=folder: measure_isolated(
            str(f), str(shared.data / "test.jsonl"), timed_ids, n_timed=config.efficiency_samples))
        efficiency[name] = {"ms_per_sample": latency[name], "ratio_to_base": latency[name] / latency["base"],
                            "peak_mem_mb": isolated["peak_mem_mb"],
                            "ms_per_sample_isolated_run": isolated["ms_per_sample"],
                            "memory_measure": isolated["memory_measure"], "n_timed": config.efficiency_samples}

    results = {
        "seed": seed,
        "data_seed": config.data_seed,
        "splits": {"train": shared.train_n, "test": len(test)},
        "stages": stages,
        "claims": claims(stages, efficiency),
        "diagnostics": diagnostics,
        "encoder": shared.encoder_info,
        "stage2_causal_reward": json.loads((stage2_dir / "causal_reward_summary.json").read_text()),
        "efficiency": efficiency,
        "timing_s": {**shared.timing, **timing, "total": round(time.perf_counter() - t0, 2)},
        "config": _signature(run, config),
    }
    for name, result in evaluations.items():
        write_text_atomic(out / f"predictions_{name}.jsonl",
                          "".join(json.dumps(p) + "\n" for p in result["predictions"]))
    write_json(out / "results.json", results)
    write_text_atomic(out / "report.md", seed_report(results, config))
    plot_accuracy(results, out / "accuracy.png")
    return results


def _causal_summary(folder: Path) -> dict:
    causal = json.loads((folder / "causal_reward_summary.json").read_text())
    return {k: causal[k] for k in ("mean_causal_reward_correct", "mean_causal_reward_wrong")}


def run_diagnostics(models: dict[str, Path], shared: Shared, intervention: str, batch_size: int) -> dict:
    """Reliance per stage; the leak probe (M vs M', with the demo's and the paper's interventions) and the
    readability probes (where the lesion evidence is: the VLM's visual tokens vs the prior encoder's tokens)."""
    train = [s for s in read_samples(shared.train_file) if s.family == "lesion"]
    test = [s for s in read_samples(shared.data / "test.jsonl") if s.family == "lesion"]
    loaded = {name: MedSynapseV.from_pretrained(folder, merge_adapter=True) for name, folder in models.items()}
    reliance = {}
    for name, model in loaded.items():
        reliance[name] = reliance_report(model, shared.test, batch_size=batch_size, intervention=intervention)
        reliance[name].pop("by_question_type", None)
    teacher, student = loaded["stage2"], loaded["stage3_student"]
    return {"intervention": intervention,
            "leak_probe": leak_probe(teacher, train, test, intervention, labels=("location",)),
            "leak_probe_zero": leak_probe(teacher, train, test, "zero", labels=("location",), with_memory=False),
            "readability": {**readability_probes(teacher, train, test, labels=("presence",)),
                            "student_memory": readability_probes(student, train, test, labels=("presence",),
                                                                 kinds=("autonomous_memory",))["autonomous_memory"]},
            "reliance": reliance}


def claims(stages: dict, efficiency: dict) -> dict:
    """The issue's acceptance quantities, computed from this run's rows (no thresholds applied here)."""
    def presence(name: str) -> float:
        return stages[name]["by_question_type"]["presence"]["accuracy"]

    base, teacher, student = (stages[n]["accuracy"] for n in ("base", "stage3_teacher", "stage3_student"))
    out = {"student_gain_retention": _ratio(student - base, teacher - base),
           "student_gain_retention_presence": _ratio(presence("stage3_student") - presence("base"),
                                                     presence("stage3_teacher") - presence("base")),
           "student_latency_ratio": efficiency.get("stage3_student", {}).get("ratio_to_base")}
    for control in ("sft", "grpo_only"):
        if control in stages:
            out[f"stage2_minus_{control}"] = stages["stage2"]["accuracy"] - stages[control]["accuracy"]
    for ablation in ("stage2_lambda0", "stage2_paper_eq5", "stage2_ranked"):  # paired per seed: same Stage I
        if ablation in stages:
            out[f"stage2_minus_{ablation}"] = stages["stage2"]["accuracy"] - stages[ablation]["accuracy"]
            out[f"sensitivity_stage2_minus_{ablation}"] = (stages["stage2"]["counterfactual_sensitivity"]
                                                           - stages[ablation]["counterfactual_sensitivity"])
    if "stage3_jsd_only" in stages:
        out["student_minus_stage3_jsd_only"] = student - stages["stage3_jsd_only"]["accuracy"]
        out["student_jsd_only_gain_retention_presence"] = _ratio(
            presence("stage3_jsd_only") - presence("base"), presence("stage3_teacher") - presence("base"))
    return out


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator != 0 else None


def seed_report(results: dict, config: DemoConfig) -> str:
    parts = [f"# MedSynapse demo (SynthMed, seed {results['seed']}, data seed {results['data_seed']})",
             f"Held-out test split: {results['splits']['test']} lesion questions on {config.test_images} images "
             "never seen in training.",
             stage_table(results),
             "## Claims", "```json\n" + json.dumps(results["claims"], indent=2) + "\n```",
             f"## Efficiency (batch 1, {config.efficiency_samples} timed samples, same questions and tokens)",
             efficiency_table(results), "## By question type", type_table(results)]
    if results["diagnostics"]:
        parts += ["## Diagnostics", diagnostics_tables(results["diagnostics"])]
    parts.append(f"Wall time: {results['timing_s']['total']:.1f} s ({json.dumps(results['timing_s'])})\n")
    return "\n\n".join(parts)


def run_demo(run: RunConfig) -> dict:
    """One seed into OUTPUT (the default), or several seeds into OUTPUT/seed_K plus a summary over seeds.

    Resumable over seeds: a seed whose results.json was written with the same settings is not run again.
    """
    config = demo_settings(run)
    check_settings(run, config)  # a bad setting fails before the shared steps run
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(run.output)
    out.mkdir(parents=True, exist_ok=True)
    shared = prepare_shared(config)
    write_run_config(seed_run(run, shared, config.seed, Path("runs/synthmed")), out / "run.yaml")
    if not config.seeds:
        return run_seed(config, run, shared, config.seed, out)
    per_seed = {}
    for seed in config.seeds:
        folder = out / f"seed_{seed}"
        previous = _finished(folder, run, config)
        if previous is not None:
            print(f"seed {seed}: already finished in {folder}, reusing its results")
            per_seed[seed] = previous
            continue
        print(f"seed {seed}: running ({len(per_seed)} of {len(config.seeds)} done)")
        per_seed[seed] = run_seed(config, run, shared, seed, folder)
    summary = summarize_seeds(per_seed)
    summary["comparisons"] = seed_comparisons({seed: out / f"seed_{seed}" for seed in config.seeds})
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", summary_report(summary))
    plot_accuracy({"stages": {k: {"accuracy": v["accuracy"]["mean"],
                                  "counterfactual_accuracy": (v.get("counterfactual_accuracy") or {}).get("mean")}
                              for k, v in summary["stages"].items()}}, out / "accuracy.png")
    return summary


# The demo's paired comparisons over seeds (row, reference): the same statistic as the study's table
# (eval/stats.compare: hierarchical bootstrap over seeds and questions, seed-level t, Holm over the family).
COMPARISONS = (("stage2", "sft"), ("stage2", "grpo_only"), ("stage2", "stage1"), ("stage2", "stage2_lambda0"),
               ("stage2", "stage2_paper_eq5"), ("stage2", "stage2_ranked"), ("stage3_student", "stage2"),
               ("stage3_student", "stage3_jsd_only"))


def seed_comparisons(folders: dict[int, Path], resamples: int = 10_000) -> dict[str, dict]:
    """Each comparison of COMPARISONS whose two rows have predictions under every seed, from the per-question
    correctness in OUTPUT/seed_K/predictions_ROW.jsonl, paired by question id; Holm-adjusted over the family."""
    from medsynapse.eval.stats import adjust_family, compare

    def correctness(row: str) -> list[dict[str, int]] | None:
        files = [folder / f"predictions_{row}.jsonl" for folder in folders.values()]
        if not all(f.is_file() for f in files):
            return None
        return [{line["id"]: int(bool(line["correct"])) for line in map(json.loads, f.read_text().splitlines())}
                for f in files]

    out = {}
    for row, reference in COMPARISONS:
        mine, theirs = correctness(row), correctness(reference)
        if mine is None or theirs is None:
            continue
        questions = sorted(set.intersection(*(set(c) for c in mine + theirs)))
        out[f"{row} − {reference}"] = compare([[c[q] for q in questions] for c in mine],
                                              [[c[q] for q in questions] for c in theirs], resamples)
    adjust_family(out, "holm")
    return out


def write_run_config(run: RunConfig, path: Path) -> None:
    """The run file with this demo's cached folders filled in (and no `synthmed` section): `medsynapse train
    stage1|stage2|stage3 --config OUTPUT/run.yaml`, `train baseline --method M --config OUTPUT/run.yaml` or `medsynapse
    pipeline --config OUTPUT/run.yaml` (its eval on the SynthMed test split) retrains the demo's stages and baselines
    by hand (the shipped configs/synthmed.yaml cannot name the cache's content-keyed folders)."""
    data = {"output": run.output, "model": asdict(run.model), "data": asdict(run.data),
            **{stage: getattr(run, stage) for stage in ("stage1", "stage2", "stage3")}, "baselines": run.baselines,
            "eval": {**asdict(run.eval), "benchmarks": ["synthmed"],
                     "data_root": str(Path(run.data.stage1_file).parent), "batch_size": 64}}
    header = ("# The demo's run on its SynthMed split, base VLM and prior encoder (written by `medsynapse demo`).\n"
              f"# Usage: medsynapse train stage1|stage2|stage3 --config {path}; medsynapse config show {path}\n")
    write_text_atomic(path, header + yaml.safe_dump(data, sort_keys=False))


def _signature(run: RunConfig, config: DemoConfig) -> dict:
    """What a seed's results depend on: the run file's sections (as written, folders not filled in) and the
    SynthMed settings other than where and which seed."""
    sections = {"model": asdict(run.model), "data": asdict(run.data), "baselines": run.baselines,
                **{stage: {k: v for k, v in getattr(run, stage).items() if k != "seed"}
                   for stage in ("stage1", "stage2", "stage3")}}
    for key in ("vlm", "encoder"):
        sections["model"].pop(key)
    # newer keys at their neutral defaults are left out, so seeds finished before they existed still match
    if not sections["model"]["encoder_feature_level"]:
        sections["model"].pop("encoder_feature_level")
    for key in ("baseline_file", "rationale_file", "rationale_corpora"):
        if not sections["data"][key]:
            sections["data"].pop(key)
    sections["data"].pop("stage1_file")
    settings = {k: v for k, v in asdict(config).items() if k not in ("seeds", "seed", "cache_dir", "threads")}
    return json.loads(json.dumps({"run": sections, "synthmed": settings}, default=str))


def _finished(folder: Path, run: RunConfig, config: DemoConfig) -> dict | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("config") == _signature(run, config) else None
