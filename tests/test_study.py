"""`medsynapse study`: the paired bootstrap against a direct computation, the study's unit sharing, and a real kill
(SIGKILL of the study process mid-training) followed by a rerun that gives the same study.json as an uninterrupted
run without retraining what had finished."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsynapse.config import ConfigError
from medsynapse.eval.stats import bootstrap_deltas, paired_bootstrap, per_question_differences, percentile_test
from medsynapse.runconfig import STAGES
from medsynapse.study import _job_kind, _waiting_on, read_study, run_study

pytestmark = pytest.mark.slow


def test_jobs_with_the_most_work_waiting_on_them_count_every_descendant():
    parents = {"train s1": None, "train s2a": "train s1", "train s2b": "train s1", "train s3": "train s2a",
               "eval s3": "train s3", "train sft": None, "eval sft": "train sft"}
    jobs = {name: (None, None, parent) for name, parent in parents.items()}
    assert _waiting_on(jobs) == {"train s1": 4, "train s2a": 2, "train s2b": 0, "train s3": 1, "eval s3": 0,
                                 "train sft": 1, "eval sft": 0}
    assert [_job_kind(n) for n in ("train stage2-s0-132d90d27c89", "eval ivt_lr-s1-cb91", "eval base")] == [
        "train stage2", "eval ivt_lr", "eval base"]  # the ETA prices each kind of job by its own mean


# --- the paired bootstrap ----------------------------------------------------------------------------------------

ROW = [[1, 1, 0, 1, 0], [1, 0, 0, 1, 1]]  # two seeds x five questions
REFERENCE = [[0, 1, 0, 0, 0], [1, 0, 0, 0, 1]]


def test_bootstrap_statistic_is_the_paired_mean_difference_over_seeds_and_questions():
    d = per_question_differences(ROW, REFERENCE)
    assert d.tolist() == [0.5, 0.0, 0.0, 1.0, 0.0] and d.mean() == pytest.approx(0.3)
    # the observed delta is the difference of the rows' mean accuracies over seeds
    assert paired_bootstrap(ROW, REFERENCE, resamples=10)["delta"] == pytest.approx(
        np.mean(ROW) - np.mean(REFERENCE))
    with pytest.raises(ValueError, match="seeds, questions"):
        per_question_differences(ROW, [[0, 1]])


def test_bootstrap_p_value_and_interval_match_the_exact_enumeration_of_every_resample():
    row = [[1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1]]
    reference = [[0, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0]]
    d = per_question_differences(row, reference)
    n = len(d)
    # direct: every one of the n^n equally likely resamples, the statistic by a plain loop
    direct = np.array([sum(d[i] for i in draw) / n for draw in itertools.product(range(n), repeat=n)])
    every = np.array(list(itertools.product(range(n), repeat=n)))
    assert np.array_equal(bootstrap_deltas(d, every), direct)  # the vectorised statistic is the loop's, exactly
    exact = percentile_test(d.mean(), direct)
    below, above = sum(x <= 0 for x in direct), sum(x >= 0 for x in direct)
    expected_p = min(1.0, 2 * (min(below, above) + 1) / (len(direct) + 1))
    assert exact["p_value"] == expected_p and 0.05 < expected_p < 0.9
    sampled = paired_bootstrap(row, reference, resamples=200_000, seed=1)
    assert sampled["p_value"] == pytest.approx(expected_p, abs=0.01)  # Monte Carlo sd ~0.001 at 200k
    assert sampled["ci95"] == pytest.approx(exact["ci95"], abs=1 / (2 * n) + 1e-9)  # atoms are 1/(2n) apart
    assert sampled["delta"] == exact["delta"]
    # identical rows: delta 0 and p 1; a row right everywhere the reference is wrong: p ~ 0
    same = paired_bootstrap(reference, reference, resamples=1000)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    better = paired_bootstrap([[1] * 40], [[0] * 40], resamples=1000)
    assert better["delta"] == 1 and better["ci95"] == [1.0, 1.0]
    assert better["p_value"] == pytest.approx(2 / 1001)  # never 0 from a finite number of resamples


def test_bootstrap_by_benchmark_averages_the_benchmarks_and_resamples_within_each():
    # benchmark "a": the row right on all 4 questions, the reference on none; benchmark "b" (16 questions): equal
    row = [[1] * 4 + [0] * 16]
    reference = [[0] * 20]
    groups = ["a"] * 4 + ["b"] * 16
    test = paired_bootstrap(row, reference, resamples=500, groups=groups)
    assert test["delta"] == pytest.approx(0.5) and test["groups"] == 2  # mean of +1 and 0, not the pooled 0.2
    assert test["ci95"] == [0.5, 0.5]  # within-group resampling keeps each benchmark's share fixed
    assert paired_bootstrap(row, reference, resamples=500)["delta"] == pytest.approx(0.2)  # pooled, one group
    with pytest.raises(ValueError, match="group labels"):
        paired_bootstrap(row, reference, groups=["a"])


def test_bootstrap_is_reproducible_from_its_seed():
    assert paired_bootstrap(ROW, REFERENCE, 500, seed=3) == paired_bootstrap(ROW, REFERENCE, 500, seed=3)


# --- the study runner --------------------------------------------------------------------------------------------


def _files(tiny_env, tmp_path: Path, rows: dict, **study) -> Path:
    run = {"output": str(tmp_path / "unused"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4, "sampler_width": 32,
                     "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": 3, "batch_size": 4, "save_every": 1, "answer_types": ["yes_no"]},
           "stage2": {"max_steps": 3, "batch_size": 2, "group_size": 2, "max_new_tokens": 3, "save_every": 1,
                      "answer_types": ["yes_no"], "temperature": 1.0, "top_p": 1.0, "intervention": "zero"},
           "stage3": {"max_steps": 2, "batch_size": 2, "max_new_tokens": 3, "save_every": 1,
                      "answer_types": ["yes_no"]},
           "eval": {"benchmarks": ["synthmed"], "data_root": str(tiny_env.train_file.parent)}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    content = {"run": "run.yaml", "seeds": [0, 1], "reference": "medsynapse_v", "eval_batch_size": 8,
               "latency_samples": 1, "reliance_conditions": ["zeroed", "counterfactual"], "bootstrap_resamples": 200,
               "rows": rows, **study}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


TWO_ROWS = {"medsynapse_v": {"model": "stage2"}, "without_stage2": {"model": "stage1", "group": "Ablations"}}
TIMING = ("wall_s", "eval_s", "train_s", "efficiency", "timing_s", "ms_per_sample", "peak_mem_mb", "output")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def test_study_killed_mid_training_resumes_to_the_same_study_json_without_retraining(tiny_env, tmp_path):
    path = _files(tiny_env, tmp_path, TWO_ROWS)
    study, raw, source = read_study(path, overrides=[f"output={tmp_path / 'straight'}"])
    straight = run_study(study, raw, source)
    units = straight["units"]
    assert units["count"] == 4 and units["cells"] == 4  # 2 seeds x (Stage I, Stage II): Stage I shared by the rows
    assert all(users == ["medsynapse_v", "without_stage2"] for users in units["shared_by_rows"].values())
    assert len(units["shared_by_rows"]) == 2  # each seed's Stage I
    cell = straight["rows"]["medsynapse_v"]["cells"]["0"]
    assert cell["accuracy"] is not None and cell["reliance"]["zeroed"] is not None
    # the counterfactual numbers, recomputed outside the study: the unit's model on the benchmark's questions
    from medsynapse.data.sources import load_source
    from medsynapse.eval.vqa import evaluate
    from medsynapse.model.medsynapse import MedSynapseV

    model = MedSynapseV.from_pretrained(tmp_path / "straight" / "units" / cell["units"][-1], merge_adapter=True)
    questions = load_source("synthmed", tiny_env.train_file.parent, tmp_path / "images").samples
    factual = evaluate(model, questions, batch_size=8)["accuracy"]
    counterfactual = evaluate(model, questions, branch="counterfactual", intervention="zero", batch_size=8)
    assert cell["accuracy"] == factual and cell["counterfactual_accuracy"] == counterfactual["accuracy"]
    assert cell["counterfactual_sensitivity"] == pytest.approx(factual - counterfactual["accuracy"])
    assert cell["efficiency"]["harness"]["synthmed"]["ms_per_sample"] > 0  # every cell: the eval's own timing
    timed = straight["rows"]["medsynapse_v"]["efficiency"]  # per row, batch 1, fresh process, after every job
    assert timed["n_timed"] == 1 and timed["ms_per_sample"] > 0 and timed["fixed_length"] is False
    assert straight["rows"]["without_stage2"]["comparison"]["n_seeds"] == 2
    assert "comparison" not in straight["rows"]["medsynapse_v"]  # the reference itself
    for name in ("study.json", "table.md", "table.csv", "accuracy.png", "efficiency.png"):
        assert (tmp_path / "straight" / name).is_file(), name
    table = (tmp_path / "straight" / "table.md").read_text()
    assert "**Ablations**" in table and "| without_stage2 |" in table and "| medsynapse_v |" in table

    # The same study in another process (two workers), killed with SIGKILL while a Stage II trains.
    killed = tmp_path / "killed"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    command = [sys.executable, "-c", "from medsynapse.cli import main; raise SystemExit(main())", "study",
               "--config", str(path), "--output", str(killed), "--workers", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and process.poll() is None:
        found = sorted(killed.glob("units/stage2-*/checkpoints/step_0000001"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None, process.communicate()[0].decode()[-3000:]
    workers = _children(process.pid)
    process.send_signal(signal.SIGKILL)  # the study only: its workers must die with it
    process.wait()
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() for pid in workers):
            break
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the killed study"
    assert not (killed / "study.json").exists()
    finished_before = {p: p.stat().st_mtime_ns for p in killed.glob("units/*/unit.json")}
    assert finished_before  # at least the Stage I that this Stage II starts from
    assert not (checkpoint.parent.parent / "unit.json").exists()  # killed mid-unit

    study, raw, source = read_study(path, overrides=[f"output={killed}"])
    resumed = run_study(study, raw, source)
    for marker, mtime in finished_before.items():
        assert marker.stat().st_mtime_ns == mtime, f"{marker.parent.name} was retrained"
    assert _without_timing(resumed) == _without_timing(straight), _differences(_without_timing(resumed),
                                                                               _without_timing(straight))

    # A third run redoes nothing: every cell file is kept as it is.
    cells = {p: p.read_bytes() for p in killed.glob("cells/*/seed_*.json")}
    assert len(cells) == 4
    again = run_study(*read_study(path, overrides=[f"output={killed}"]))
    assert {p: p.read_bytes() for p in killed.glob("cells/*/seed_*.json")} == cells
    assert _without_timing(again) == _without_timing(straight)


def test_study_file_is_checked_before_anything_runs(tiny_env, tmp_path):
    path = _files(tiny_env, tmp_path, {**TWO_ROWS, "odd": {"model": "stage4"}})
    with pytest.raises(ConfigError, match=r"rows\.odd\.model"):
        read_study(path)
    path = _files(tiny_env, tmp_path, {"sft": {"model": "baseline"}})
    with pytest.raises(ConfigError, match=r"rows\.sft\.method"):
        read_study(path)
    path = _files(tiny_env, tmp_path, {"a": {"model": "stage1", "reference": "b"}})
    with pytest.raises(ConfigError, match=r"rows\.a\.reference"):
        read_study(path)
    path = _files(tiny_env, tmp_path, TWO_ROWS)
    with pytest.raises(ConfigError, match=r"unknown row\(s\) \['nope'\]"):
        read_study(path, rows=["nope"])
    path = _files(tiny_env, tmp_path, TWO_ROWS, seeds=[1, 1])
    with pytest.raises(ConfigError, match="seeds"):
        read_study(path)


def test_the_shipped_synthmed_study_plans_shared_units(tmp_path):
    """The default study's plan (no training): which units each row needs and which rows share them."""
    from medsynapse.study import plan_units, row_run

    root = Path(__file__).resolve().parents[1]
    study, raw, source = read_study(root / "configs" / "study-synthmed.yaml")
    assert study.seeds == [0, 1, 2] and len(study.rows) == 22

    class Shared:  # the cached folders' stand-ins (nothing is read from them when planning)
        vlm_base, encoder, train_file, data = "VLM", "ENCODER", "TRAIN", "CACHE/DATA"

    chains = {name: plan_units(row_run(raw, source, row, 0, Shared()), row, 0, tmp_path)
              for name, row in study.rows.items()}
    names = {name: [u.name for u in chain] for name, chain in chains.items()}
    stage1, stage2, stage3 = names["medsynapse_v_imt"]
    caches = {u.config.prior_cache for chain in chains.values() for u in chain if u.kind in STAGES}
    assert caches == {str(Path("CACHE") / "prior-features")}  # every memory unit reads the one feature cache
    assert names["without_stage2"] == [stage1] and names["medsynapse_v"] == [stage1, stage2]
    for row in ("lambda_causal_0", "causal_paper_eq5", "intervention_zero", "intervention_drop"):
        assert names[row][0] == stage1 and names[row][1] != stage2  # its own Stage II from the shared Stage I
    for row in ("probes_4", "probes_64"):
        assert names[row][0] != stage1  # N changes Stage I
    for row in ("jsd_beta_0", "jsd_beta_1", "off_policy", "apsi_grid", "apsi_jsd_only"):
        assert names[row][:2] == [stage1, stage2] and names[row][2] != stage3
    assert chains["off_policy"][2].config.trajectories == "teacher"
    assert chains["probes_64"][0].config.n_memory == 64
    assert chains["medsynapse_v"][1].config.model == chains["medsynapse_v"][0].config.output_dir
    units = {u for chain in names.values() for u in chain}
    assert len(units) == 22  # per seed: 3 shared stages, 4 + 2x2 Stage II-side, 5 Stage III, 6 baselines
    other_seed = plan_units(row_run(raw, source, study.rows["medsynapse_v"], 1, Shared()),
                            study.rows["medsynapse_v"], 1, tmp_path)
    assert {u.name for u in other_seed}.isdisjoint(units)
