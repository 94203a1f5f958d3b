"""`medsynapse demo`'s per-seed report: what the demo measures beyond the study's table, over the models of a finished
demo study (study.demo_study, study.run_study: the one driver trains and scores every row; this module trains nothing).

Per training seed, into OUTPUT (one seed) or OUTPUT/seed_K (several):
1. every row's model folder linked under the row's name (OUTPUT/stage2 -> units/stage2-s0-KEY) and its answers
   (predictions_ROW.jsonl, the harness's, one line per question);
2. results.json: `stages` (each row's accuracy, n, unparseable answers and accuracy per question type from the study's
   cell; memory rows with the accuracy under the counterfactual memory M'; `stage3_teacher` is the Stage II model
   with its privileged memory: the same weights, the same answers), `claims`, `diagnostics` (the memory-reliance
   report per stage, the leak and readability probes), `efficiency` (latency of base, teacher and student side by
   side in one process; peak memory of each in a fresh one), the encoder's metrics and Stage II's causal reward;
3. report.md and accuracy.png.
A seed's report is kept while its signature (the cells it reads and these settings) is the same: the study's
units.json / result.json / cells decide what is trained and scored again, this file only what is measured on top.
Several seeds: summary.json / summary.md over seeds for these measurements (mean ± sd [95 % t-interval]); the rows'
accuracies and their paired comparisons over seeds and questions are the study's (study.json, table.md).
OUTPUT/run.yaml: the same Stage I-III settings as a run file naming the cached folders.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

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
from medsynapse.locking import link_folder, write_text_atomic
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.runconfig import RunConfig, resolve
from medsynapse.steps.synthmed import DemoConfig, Shared, demo_settings, prepare_shared, seed_run, stopwatch

ROW_FIELDS = ("accuracy", "n", "unparseable", "by_question_type")


def write_reports(study_result: dict, run: RunConfig) -> dict:
    """Step 1-3 of the module docstring for every seed of the demo study's result (study.json's content); returns
    the one seed's results, or the summary over seeds."""
    config = demo_settings(run)
    output = Path(run.output)
    shared = prepare_shared(config)  # cached by the study's first step: named, not built again
    write_run_config(seed_run(run, shared, config.seed, Path("runs/synthmed")), output / "run.yaml")
    seeds = study_result["seeds"]
    per_seed = {}
    for seed in seeds:
        folder = output if len(seeds) == 1 else output / f"seed_{seed}"
        per_seed[seed] = seed_results(study_result, run, config, shared, seed, folder)
    if len(seeds) == 1:
        return per_seed[seeds[0]]
    summary = {**summarize_seeds({seed: {k: v for k, v in r.items() if k != "stages"}
                                  for seed, r in per_seed.items()}),
               "rows": "study.json, table.md (the study's: every row over seeds, its paired comparison)"}
    write_json(output / "summary.json", summary)
    write_text_atomic(output / "summary.md", summary_report(summary))
    return summary


def seed_results(study_result: dict, run: RunConfig, config: DemoConfig, shared: Shared, seed: int,
                 folder: Path) -> dict:
    """One seed's report (module docstring), kept when its results.json has the same signature."""
    began = time.perf_counter()
    output = Path(run.output)
    cells = {row: spec["cells"][str(seed)] for row, spec in study_result["rows"].items()}
    signature = _signature(cells, config)
    previous = folder / "results.json"
    if previous.is_file() and json.loads(previous.read_text()).get("config") == signature:
        print(f"demo: seed {seed}'s report already written with the same models and settings: {previous}")
        return json.loads(previous.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    # the study's layout (study.plan_units, plan_study): OUTPUT/units/<unit>, OUTPUT/evals/<evaluation>/<harness>
    models = {row: output / "units" / cell["units"][-1] if cell["units"] else shared.vlm_base
              for row, cell in cells.items()}
    for row, cell in cells.items():
        if cell["units"]:
            link_folder(folder / row, models[row])
        _write_predictions(output / "evals" / cell["evaluation"] / cell["harness"], folder / f"predictions_{row}.jsonl")
    timing: dict[str, float] = {}
    timed = stopwatch(timing)
    intervention = resolve(seed_run(run, shared, seed, folder), "stage2").intervention
    stages = {row: _stage_row(cell) for row, cell in cells.items()}
    # The Stage III teacher is the Stage II model with its privileged memory: same weights, same answers.
    stages["stage3_teacher"] = {k: stages["stage2"][k] for k in ROW_FIELDS}
    for row in cells:
        if (models[row] / "causal_reward_summary.json").is_file():
            stages[row].update(_causal_summary(models[row]))
    diagnostics = {}
    if config.diagnostics:
        diagnostics = timed("diagnostics", lambda: run_diagnostics(
            {"stage1": models["stage1"], "stage2": models["stage2"], "stage3_student": models["stage3_student"]},
            shared, intervention, config.eval_batch_size))
    efficiency = timed_efficiency(config, shared, {"base": shared.vlm_base, "stage3_teacher": models["stage2"],
                                                   "stage3_student": models["stage3_student"]}, timed)
    trained = {row: cell["train_s"][cell["units"][-1]] for row, cell in cells.items() if cell["units"]}
    evaluated = {f"eval_{row}": cell["eval_s"] for row, cell in cells.items()}
    results = {
        "seed": seed,
        "data_seed": config.data_seed,
        "splits": {"train": shared.train_n, "test": len(shared.test)},
        "stages": stages,
        "claims": claims(stages, efficiency),
        "diagnostics": diagnostics,
        "encoder": shared.encoder_info,
        "stage2_causal_reward": json.loads((models["stage2"] / "causal_reward_summary.json").read_text()),
        "efficiency": efficiency,
        "timing_s": {**study_result["shared"].get("timing_s", {}), **trained, **evaluated, **timing,
                     "total": round(sum(trained.values()) + sum(evaluated.values())
                                    + time.perf_counter() - began, 2)},
        "config": signature,
    }
    write_json(folder / "results.json", results)
    write_text_atomic(folder / "report.md", seed_report(results, config))
    if folder != output:  # one seed: the study's accuracy.png (the same rows) is in OUTPUT
        plot_accuracy(results, folder / "accuracy.png")
    return results


def _stage_row(cell: dict) -> dict:
    """A row of results.json's `stages` from the study's cell of that row and seed."""
    bench = cell["benchmarks"]["synthmed"]
    row = {"accuracy": cell["accuracy"], "n": bench["n"], "unparseable": bench["unparseable"],
           "by_question_type": cell["by_question_type"]}
    if cell.get("counterfactual_accuracy") is not None:
        row["counterfactual_accuracy"] = cell["counterfactual_accuracy"]
        row["counterfactual_sensitivity"] = cell["counterfactual_sensitivity"]
    return row


def _write_predictions(harness: Path, path: Path) -> None:
    """The harness's answers of the row's model (one line per question, the newest), as predictions_ROW.jsonl."""
    from medsynapse.eval.runner import PREDICTIONS, latest_per_id, read_predictions

    lines = latest_per_id(read_predictions(harness / "synthmed" / PREDICTIONS, repair=False))
    # without the time each answer took: the same models give the same file, byte for byte
    write_text_atomic(path, "".join(json.dumps({k: v for k, v in line.items() if k != "ms"}) + "\n"
                                    for line in lines))


def timed_efficiency(config: DemoConfig, shared: Shared, folders: dict[str, Path], timed) -> dict:
    """Latency side by side in one process; memory of each model in a fresh process (clean peak). 0 samples: none."""
    if not config.efficiency_samples:
        return {}
    test = shared.test
    timed_ids = [s.id for s in test[:config.efficiency_samples + 3]]
    # (mypy cannot infer a lambda whose default argument binds the loop variable: "Cannot infer type")
    latency = timed("efficiency_latency", lambda: compare_latency(
        {name: (lambda f=f: MedSynapseV.from_pretrained(f, merge_adapter=True)) for name, f in folders.items()},  # type: ignore[misc]
        test, n_timed=config.efficiency_samples))
    efficiency = {}
    for name, folder in folders.items():
        isolated = timed(f"efficiency_memory_{name}", lambda f=folder: measure_isolated(
            str(f), str(shared.data / "test.jsonl"), timed_ids, n_timed=config.efficiency_samples))
        efficiency[name] = {"ms_per_sample": latency[name], "ratio_to_base": latency[name] / latency["base"],
                            "peak_mem_mb": isolated["peak_mem_mb"],
                            "ms_per_sample_isolated_run": isolated["ms_per_sample"],
                            "memory_measure": isolated["memory_measure"], "n_timed": config.efficiency_samples}
    return efficiency


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


def _signature(cells: dict[str, dict], config: DemoConfig) -> dict:
    """What a seed's report depends on: the models and evaluations of its cells (their hashes and units) and the
    SynthMed settings of what it measures."""
    measured = {k: v for k, v in asdict(config).items() if k not in ("seeds", "seed", "cache_dir", "threads")}
    return json.loads(json.dumps({"cells": {row: [cell["hash"], cell["units"]] for row, cell in cells.items()},
                                  "synthmed": measured}, default=str))
