"""The study states what each row tests: `--plan` for both shipped studies (no row shares its reference's model,
the 8B rows of their own), the refusal of a row equal to its reference, the data parity table, the priced hours, the
base in both answer formats, and the table's Δ and p against a direct computation from the cells."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsynapse.config import ConfigError
from medsynapse.eval.stats import adjust_p_values, compare
from medsynapse.runconfig import baseline_file, rationale_file, read_run_config, stage1_file, stage2_file
from medsynapse.steps.prepare import write_union
from medsynapse.study import (
    Evaluation,
    Plan,
    describe_plan,
    markdown_table,
    parity_markdown,
    read_study,
    run_study,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def _plan(name: str) -> dict:
    return describe_plan(*read_study(ROOT / "configs" / name))


@pytest.mark.parametrize("name", ["study-synthmed.yaml", "study-8b.yaml"])
def test_every_shipped_row_plans_and_none_is_its_own_reference(name):
    plan = _plan(name)
    for row, value in plan["rows"].items():
        reference = value["reference"]
        if reference is None:
            continue
        for seed, evaluation in value["evaluation"].items():
            assert evaluation != plan["rows"][reference]["evaluation"][seed], (row, reference)
    assert plan["rows"]["base"]["answer_format"] == "direct"
    assert plan["rows"]["base_reasoning"]["answer_format"] == "reasoning"
    assert plan["rows"]["base_reasoning"]["evaluation"]["0"] == "base-reasoning"


def test_the_8b_study_has_rows_of_its_own_against_the_papers_method():
    plan = _plan("study-8b.yaml")
    rows = plan["rows"]
    assert plan["seeds"] == [0, 1, 2, 3, 4]
    # the counts docs/results.md quotes: per seed 3 Stage I, 8 Stage II, 7 Stage III units and the 6 baselines
    assert plan["distinct"]["units_per_seed_by_kind"] == {"sft": 1, "cot-sft": 1, "grpo": 1, "coconut": 1,
                                                          "mcout": 1, "ivt-lr": 1, "stage1": 3, "stage2": 8,
                                                          "stage3": 7}
    assert plan["distinct"]["evaluations"] == 22 * 5 + 2  # every trained model once, the base in two formats
    for row in ("causal_centred", "intervention_reference", "project_stage2", "lambda_causal_0"):
        assert rows[row]["reference"] == "medsynapse_v" and rows[row]["units"]["0"][0] == rows["medsynapse_v"][
            "units"]["0"][0]  # its own Stage II from the paper's Stage I
    for row in ("memory_alignment", "apsi_attention", "project_stage3"):
        assert rows[row]["reference"] == "medsynapse_v_imt"
        assert rows[row]["units"]["0"][:2] == rows["medsynapse_v_imt"]["units"]["0"][:2]
    assert rows["medsynapse_v"]["answer_format"] == "reasoning" and rows["sft"]["answer_format"] == "direct"
    assert plan["scored_questions_per_model"] == 12750
    assert plan["hours"]["total"] == pytest.approx(sum(r["hours_added"] for r in rows.values()), abs=0.05)
    # the baselines see what MedSynapse-V sees across its stages; the reasoning rows a rationale file of their own
    parity = plan["parity"]
    assert parity["sft"]["units"][0]["file"].endswith("data/baselines.jsonl")
    assert parity["sft"]["units"][0]["records"] == 50000 + 4000
    assert parity["mcout"]["units"][0]["file"] == parity["sft"]["units"][0]["file"]
    for row in ("cot_sft", "coconut", "ivt_lr"):
        assert parity[row]["units"][0]["file"].endswith("data/rationale.jsonl")
    assert parity["medsynapse_v"]["units"][0]["file"].endswith("data/stage1.jsonl")
    assert parity["medsynapse_v"]["units"][1]["file"].endswith("data/stage2.jsonl")
    assert parity["sft"]["units"][0]["steps"] == -(-3 * 54000 // 32)  # Stage I's 3 epochs over both files


def test_baseline_and_rationale_files_leave_stage1_as_it_is(tmp_path):
    run = read_run_config(ROOT / "configs" / "medsynapse-v-8b.yaml")
    assert stage1_file(run).endswith("stage1.jsonl") and baseline_file(run).endswith("baselines.jsonl")
    assert rationale_file(run).endswith("rationale.jsonl") and stage2_file(run).endswith("stage2.jsonl")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text('{"id": "a"}\n{"id": "b"}\n')
    two.write_text('{"id": "c"}\n\n')
    report = write_union([str(one), str(two)], str(tmp_path / "union.jsonl"))
    assert (tmp_path / "union.jsonl").read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    assert report == {"files": {str(one): 2, str(two): 1}, "records": 3}
    synthmed = read_run_config(ROOT / "configs" / "synthmed.yaml", ["data.stage1_file=T.jsonl"])
    assert baseline_file(synthmed) == rationale_file(synthmed) == stage1_file(synthmed) == "T.jsonl"  # one file


def _tiny_study(tiny_env, tmp_path: Path, rows: dict, **study) -> Path:
    run = {"output": str(tmp_path / "unused"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4, "sampler_width": 32,
                     "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": 3, "batch_size": 4, "answer_types": ["yes_no"]},
           "stage2": {"max_steps": 3, "batch_size": 2, "group_size": 2, "max_new_tokens": 3,
                      "answer_types": ["yes_no"], "intervention": "zero"},
           "eval": {"benchmarks": ["synthmed"], "data_root": str(tiny_env.train_file.parent)}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    content = {"run": "run.yaml", "seeds": [0, 1], "reference": "medsynapse_v", "eval_batch_size": 8,
               "latency_samples": 0, "reliance_conditions": [], "bootstrap_resamples": 200,
               "output": str(tmp_path / "out"), "rows": rows, **study}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_a_row_that_changes_nothing_is_refused_naming_both_rows_and_the_unit(tiny_env, tmp_path):
    rows = {"medsynapse_v": {"model": "stage2"},
            "zero_again": {"model": "stage2", "set": ["stage2.intervention=zero"]}}  # the run file says zero already
    with pytest.raises(ConfigError, match=r"row 'zero_again' .* reference 'medsynapse_v' \(unit stage2-s0-"):
        describe_plan(*read_study(_tiny_study(tiny_env, tmp_path, rows)))
    rows["zero_again"]["set"] = ["stage2.intervention=drop"]  # a real change plans
    assert describe_plan(*read_study(_tiny_study(tiny_env, tmp_path, rows)))["distinct"]["units"] == 2 * 3


def test_parity_table_and_hours_from_the_units_and_the_costs(tiny_env, tmp_path):
    rows = {"medsynapse_v": {"model": "stage2"}, "without_stage2": {"model": "stage1"},
            "sft": {"model": "baseline", "method": "sft"}}
    costs = {"step_s": {"stage1": 3600, "stage2": 7200}, "question_s": {"direct": 36}, "questions": {"synthmed": 100}}
    plan = describe_plan(*read_study(_tiny_study(tiny_env, tmp_path, rows, costs=costs)))
    sha = hashlib.sha256(tiny_env.train_file.read_bytes()).hexdigest()
    records = sum(1 for line in tiny_env.train_file.read_text().splitlines() if line.strip())
    stage1, stage2 = plan["parity"]["medsynapse_v"]["units"]
    assert (stage1["sha256"], stage1["records"], stage1["steps"], stage1["batch"], stage1["samples_seen"]) == (
        sha, records, 3, 4, 12)
    assert (stage2["steps"], stage2["samples_seen"], stage2["rollouts_per_prompt"]) == (3, 6, 2)
    assert plan["parity"]["sft"]["units"][0]["file"] == str(tiny_env.train_file)
    table = parity_markdown(plan["parity"]).splitlines()
    assert table[4] == (f"| medsynapse_v | {stage1['unit'].split('-s')[0]} | {tiny_env.train_file.name} | {sha[:12]} | "
                        f"{records} | 3 | 4 | 12 |")  # a known file: its SHA-256's first 12 digits
    assert parity_markdown({"base": {"units": []}}).splitlines()[-1] == "| base | — | — | — | — | — | — | — |"
    # without_stage2: 2 seeds x (3 Stage I steps x 1 h + 100 questions x 36 s); its Stage I is medsynapse_v's
    assert plan["rows"]["without_stage2"]["hours_alone"] == pytest.approx(2 * (3 + 1))
    assert plan["rows"]["medsynapse_v"]["hours_alone"] == pytest.approx(2 * (3 + 3 * 2 + 1))
    assert plan["rows"]["without_stage2"]["hours_added"] == pytest.approx(2 * 1)  # only its evaluation is new
    with pytest.raises(ConfigError, match="costs"):
        read_study(_tiny_study(tiny_env, tmp_path, rows, costs={"gpu": 1}))


def test_the_base_is_scored_in_both_formats_and_the_format_is_a_column(tiny_env, tmp_path):
    rows = {"base": {"model": "base", "reference": "none"},
            "base_reasoning": {"model": "base", "answer_format": "reasoning", "reference": "base"}}
    result = run_study(*read_study(_tiny_study(tiny_env, tmp_path, rows, reference="base", reasoning_tokens=4)))
    assert result["rows"]["base"]["answer_format"] == "direct"
    assert result["rows"]["base_reasoning"]["answer_format"] == "reasoning"
    def prompts(name: str) -> list[str]:
        lines = next((tmp_path / "out" / "evals" / name).glob("harness-*/synthmed/predictions.jsonl")).read_text()
        return [json.loads(line)["prompt"] for line in lines.splitlines()]

    assert all("<answer></answer>" in p for p in prompts("base-reasoning"))  # asked for its analysis, then tagged
    assert not any("<answer>" in p for p in prompts("base"))
    table = markdown_table(result)
    assert "| base_reasoning | reasoning |" in table and "| base | direct |" in table
    with pytest.raises(ConfigError, match="answer_format"):
        read_study(_tiny_study(tiny_env, tmp_path, {"base": {"model": "base", "answer_format": "verbose"}}))


def test_the_tables_delta_and_p_equal_a_direct_computation_from_the_cells(tmp_path):
    """summarize on hand-made cells: each row's Δ, intervals and p are compare() on its own and its reference's
    answers (a row compared with itself would give Δ 0), the adjusted p Holm over its table."""
    from medsynapse.study import RowSpec, StudyConfig

    generator = np.random.default_rng(0)
    answers = {"ref": 0.5, "a": 0.7, "b": 0.45, "c": 0.55}
    seeds, questions = [0, 1, 2], [f"synthmed/q{i:03d}" for i in range(60)]  # in the order summarize sorts them
    correct, cells, evaluations = {}, {}, {}
    for row, rate in answers.items():
        for seed in seeds:
            name = f"{row}-s{seed}"
            values = (generator.random(len(questions)) < rate + 0.05 * seed).astype(int).tolist()
            correct[(row, seed)] = values
            folder = tmp_path / name
            folder.mkdir()
            (folder / "correct.json").write_text(json.dumps(dict(zip(questions, values))))
            evaluations[name] = Evaluation(name, "", str(folder), ["synthmed"], "", 8, None, None, "zero", [], 0)
            cells[(row, seed)] = {"seed": seed, "evaluation": name, "accuracy": float(np.mean(values)),
                                  "by_question_type": {}, "answer_format": "direct"}
    study = StudyConfig(rows={"ref": RowSpec("stage2"), "a": RowSpec("stage2"), "b": RowSpec("stage2"),
                              "c": RowSpec("stage2", group="Other")}, seeds=seeds, reference="ref",
                        bootstrap_resamples=500)
    planned = {key: {"evaluation": cell["evaluation"], "units": []} for key, cell in cells.items()}
    result = summarize(study, Plan({}, evaluations, planned), cells, {}, {}, 0.0)
    rows = result["rows"]
    for row in ("a", "b", "c"):
        mine = [correct[(row, s)] for s in seeds]
        theirs = [correct[("ref", s)] for s in seeds]
        direct = compare(mine, theirs, 500, 0, groups=["synthmed"] * len(questions))
        got = rows[row]["comparison"]
        assert got["delta"] == pytest.approx(np.mean(mine) - np.mean(theirs), abs=1e-12) != 0
        assert (got["delta"], got["ci95"], got["p_value"]) == (direct["delta"], direct["ci95"], direct["p_value"])
        assert got["seed_t"] == direct["seed_t"]
    table_1 = adjust_p_values([rows["a"]["comparison"]["p_value"], rows["b"]["comparison"]["p_value"]])
    assert [rows["a"]["comparison"]["p_adjusted"], rows["b"]["comparison"]["p_adjusted"]] == table_1
    assert rows["c"]["comparison"]["p_adjusted"] == rows["c"]["comparison"]["p_value"]  # a family of one
    assert rows["a"]["comparison"]["correction"] == {"method": "holm", "family_size": 2}
    study.correction = "bh"
    again = summarize(study, Plan({}, evaluations, planned), cells, {}, {}, 0.0)["rows"]
    assert again["b"]["comparison"]["correction"] == {"method": "bh", "family_size": 2}
    assert [again["a"]["comparison"]["p_adjusted"], again["b"]["comparison"]["p_adjusted"]] == adjust_p_values(
        [rows["a"]["comparison"]["p_value"], rows["b"]["comparison"]["p_value"]], "bh")
    assert "comparison" not in rows["ref"]


def test_the_pipeline_scores_the_base_in_both_formats_when_the_stages_reason():
    from medsynapse.study import pipeline_study

    paper = ROOT / "configs" / "medsynapse-v-8b.yaml"
    study = pipeline_study(paper)[0]
    assert list(study.rows) == ["base", "base_reasoning", "stage2", "student"]  # as the study scores them
    assert [r.answer_format for r in study.rows.values()] == ["", "reasoning", "", ""]
    assert [r.model for r in study.rows.values()] == ["base", "base", "stage2", "stage3"]
    forced = pipeline_study(paper, ["eval.answer_format=direct"])[0]
    assert list(forced.rows) == ["base", "stage2", "student"]  # one format asked for: every row in it
    assert {r.answer_format for r in forced.rows.values()} == {"direct"}
    run = read_run_config(paper)
    assert (study.benchmarks, study.data_root, study.eval_batch_size, study.seeds) == (
        run.eval.benchmarks, run.eval.data_root, run.eval.batch_size, [0])
    assert (study.reliance_conditions, study.latency_samples, study.reference) == ([], 0, "stage2")
    synthmed = pipeline_study(ROOT / "configs" / "synthmed.yaml")[0]
    assert list(synthmed.rows) == ["base", "stage2", "student"]  # direct stages: the base answers directly


def test_a_pipeline_trains_its_stages_at_one_seed(tmp_path):
    from medsynapse.config import ConfigError
    from medsynapse.study import pipeline_study

    paper = ROOT / "configs" / "medsynapse-v-8b.yaml"
    assert pipeline_study(paper, ["stage1.seed=3", "stage2.seed=3", "stage3.seed=3"])[0].seeds == [3]
    with pytest.raises(ConfigError, match=r"the stages' seeds differ \({'stage1': 0, 'stage2': 1, 'stage3': 0}\)"):
        pipeline_study(paper, ["stage2.seed=1"])


def test_the_question_type_table_shows_each_rows_mean_and_sd_per_type():
    from medsynapse.eval.report import mean_sd_ci
    from medsynapse.study import question_type_markdown

    result = {"rows": {"a": {"label": "A", "by_question_type": {"presence": mean_sd_ci([1.0, 0.9]),
                                                                "count": mean_sd_ci([0.5, 0.7])}},
                       "b": {"label": "B", "by_question_type": {"count": mean_sd_ci([0.25])}}}}
    lines = question_type_markdown(result).splitlines()
    assert lines[2:] == ["| row | count | presence |", "|---|---|---|", "| A | 0.60 ± 0.14 | 0.95 ± 0.07 |",
                         "| B | 0.25 | — |"]


def test_several_benchmarks_give_a_per_benchmark_table_of_means_over_seeds(tmp_path):
    """Table 1's columns: each benchmark's accuracy, mean ± sd over the seeds that scored it; a benchmark with
    nothing scored is — (not a zero); one benchmark gives no such table (its accuracy is the row's)."""
    from medsynapse.study import RowSpec, StudyConfig, markdown_table

    study = StudyConfig(rows={"ref": RowSpec("stage2")}, seeds=[0, 1], reference="none")
    evaluations, cells = {}, {}
    for seed, (a, b) in enumerate([(0.5, 0.25), (0.7, 0.75)]):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "correct.json").write_text("{}")
        evaluations[f"e{seed}"] = Evaluation(f"e{seed}", "", str(folder), ["x", "y", "z"], "", 8, None, None, "zero",
                                             [], 0)
        cells[("ref", seed)] = {"seed": seed, "evaluation": f"e{seed}", "accuracy": (a + b) / 2,
                                "by_question_type": {}, "answer_format": "direct",
                                "benchmarks": {"x": {"accuracy": a}, "y": {"accuracy": b}, "z": {"accuracy": None}}}
    planned = {key: {"evaluation": cell["evaluation"], "units": []} for key, cell in cells.items()}
    result = summarize(study, Plan({}, evaluations, planned), cells, {}, {}, 0.0)
    by_benchmark = result["rows"]["ref"]["by_benchmark"]
    assert by_benchmark["x"]["mean"] == pytest.approx(0.6) and by_benchmark["y"]["mean"] == pytest.approx(0.5)
    assert by_benchmark["x"]["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and by_benchmark["z"] is None
    table = markdown_table(result)
    assert "| row | x | y | z |" in table and "| ref | 0.60 ± 0.14 | 0.50 ± 0.35 | — |" in table
    for cell in cells.values():
        cell["benchmarks"] = {"x": cell["benchmarks"]["x"]}
    assert "by_benchmark" not in summarize(study, Plan({}, evaluations, planned), cells, {}, {}, 0.0)["rows"]["ref"]


def test_the_evaluation_engine_is_in_an_evaluations_settings_only_when_it_is_not_transformers(tiny_env, tmp_path):
    import importlib.util

    from medsynapse.study import Evaluation

    rows = {"medsynapse_v": {"model": "stage2"}}
    job = Evaluation("m", "dir", "out", ["synthmed"], "data", 8, None, None, "zero", [], 0)
    assert "engine" not in job.settings()  # the default: earlier evaluations keep their settings and hashes
    assert dataclasses.replace(job, engine="vllm").settings()["engine"] == "vllm"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"eval_engine: engine vllm needs vLLM"):
            read_study(_tiny_study(tiny_env, tmp_path, rows, eval_engine="vllm"))
    with pytest.raises(ConfigError, match=r"eval_engine"):
        read_study(_tiny_study(tiny_env, tmp_path, rows, eval_engine="sglang"))
