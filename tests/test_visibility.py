"""The visibility axis (issue 31): study rows with their own SynthMed settings get their own base VLM (same data and
encoder), each base VLM's token readability is measured, and rows with a `series` are tabled and plotted against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medsynapse.cli import main
from medsynapse.config import ConfigError
from medsynapse.runconfig import read_run_config
from medsynapse.steps.synthmed import demo_settings, shared_folders
from medsynapse.study import (
    plan_units,
    read_study,
    row_run,
    synthmed_shareds,
    visibility_markdown,
    visibility_points,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_the_visibility_study_gives_each_level_its_own_base_vlm_and_keeps_data_and_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    study, raw, source = read_study(CONFIGS / "study-visibility.yaml")
    shareds = synthmed_shareds(study, raw, source, build=False)
    assert len(shareds) == 2
    assert len({s.data for s in shareds.values()}) == 1 and len({s.encoder for s in shareds.values()}) == 1
    demo = demo_settings(read_run_config(CONFIGS / "synthmed.yaml"))
    vlms = {level: row_run(raw, source, study.rows[f"teacher_{level}"], 0, shareds).model.vlm
            for level in ("low", "high")}
    assert len(set(vlms.values())) == 2 and vlms["high"] == str(shared_folders(demo)["vlm_base"])  # the demo's own
    for name, row in study.rows.items():
        run = row_run(raw, source, row, 0, shareds)
        level = next((lv for lv in vlms if name.endswith(f"_{lv}")), "high")
        assert run.model.vlm == vlms[level], name
        first = plan_units(run, row, 0, tmp_path)
        trained_on = first[0].config.vlm if first[0].kind == "stage1" else first[0].config.model
        assert trained_on == vlms[level], name  # every encoder-free row trains from its level's base VLM
    chains = {name: plan_units(row_run(raw, source, row, 0, shareds), row, 0, tmp_path)
              for name, row in study.rows.items()}
    student = [u.name for u in chains["student_high"]]
    for remedy, key, value in (("student_first_token", "jsd_positions", "first"), ("student_adapted", "adapt_steps",
                                                                                    100)):
        assert [u.name for u in chains[remedy]][:2] == student[:2] and chains[remedy][2].name != student[2]
        assert getattr(chains[remedy][2].config, key) == value


def test_base_rows_on_different_base_vlms_are_scored_apart(tmp_path, monkeypatch):
    """Each base VLM of the axis is its own model to score (one `base` evaluation for all would score the first)."""
    from medsynapse.study import describe_plan

    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    plan = describe_plan(*read_study(CONFIGS / "visibility-levels.yaml"))
    assert plan["distinct"]["evaluations"] == 8 == len({row["evaluation"]["0"] for row in plan["rows"].values()})
    single = describe_plan(*read_study(CONFIGS / "study-synthmed.yaml"))  # one base VLM: still called `base`
    assert single["rows"]["base"]["evaluation"]["0"] == "base"


def test_a_row_that_changes_the_data_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    study = {"run": str(CONFIGS / "synthmed.yaml"), "seeds": [0], "output": str(tmp_path / "out"),
             "rows": {"base": {"model": "base"},
                      "smaller": {"model": "base", "set": ["synthmed.test_images=10"], "reference": "none"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"rows\.smaller: its `set` changes SynthMed's data"):
        synthmed_shareds(*read_study(path), build=False)
    capsys.readouterr()
    assert main(["study", "--config", str(path), "--plan"]) == 2
    assert "rows.smaller" in capsys.readouterr().err


def _result(levels: dict, rows: dict) -> dict:
    return {"shared": {"levels": levels}, "rows": rows}


def _row(series: str, mean: float, presence: float | None = None) -> dict:
    stat = {"mean": mean, "sd": 0.01, "ci95": [mean - 0.02, mean + 0.02]}
    types = {"presence": {"mean": presence, "sd": 0.0, "ci95": [presence, presence]}} if presence is not None else {}
    return {"label": f"{series} row", "series": series, "summary": {"accuracy": stat}, "by_question_type": types}


def test_visibility_points_place_each_series_row_at_its_levels_readability_by_value():
    levels = {"a": {"rows": ["t_low", "s_low"], "token_readability": {"accuracy": 0.7, "ci95": [0.6, 0.8],
                                                                     "chance": 0.69}},
              "b": {"rows": ["t_high", "s_high", "plain"], "token_readability": {"accuracy": 0.9, "ci95": [0.85, 0.94],
                                                                               "chance": 0.69}},
              "c": {"rows": ["unmeasured"]}}
    rows = {"t_high": _row("teacher", 0.6, 0.95), "t_low": _row("teacher", 0.5, 0.9), "s_low": _row("student", 0.4),
            "s_high": _row("student", 0.55, 0.8), "plain": {**_row("x", 0.1), "series": ""},
            "unmeasured": _row("teacher", 0.3)}
    points = visibility_points(_result(levels, rows))
    assert [(p["series"], p["row"], p["readability"]) for p in points] == [
        ("student", "s_low", 0.7), ("student", "s_high", 0.9), ("teacher", "t_low", 0.7), ("teacher", "t_high", 0.9)]
    assert points[3]["accuracy"]["mean"] == 0.6 and points[3]["presence"]["mean"] == 0.95
    assert points[0]["presence"] is None and points[0]["majority"] == 0.69
    table = visibility_markdown(points).splitlines()
    assert table[-1] == "| teacher | teacher row | 0.900 [0.850, 0.940] | 0.600 ± 0.010 [0.580, 0.620] | " \
                        "0.95 ± 0.00 [0.95, 0.95] |"
    assert table[4].endswith("| — |")  # no presence questions scored: a dash, not a zero
    assert visibility_points(_result({}, rows)) == []


@pytest.mark.slow
def test_a_study_over_two_levels_measures_each_base_vlm_and_plots_the_rows_against_it(tmp_path, monkeypatch):
    """Two base-VLM rows that differ only in the vision tower's lesion pre-training: two base VLMs, one data split,
    each VLM's token readability measured once (cached) and in study.json, the table's visibility section and
    visibility.png."""
    monkeypatch.setenv("MEDSYNAPSE_CACHE", str(tmp_path / "cache"))
    tiny = ["synthmed.train_images=16", "synthmed.test_images=6", "synthmed.base_steps=2", "synthmed.encoder_steps=2"]
    study = {"run": str(CONFIGS / "synthmed.yaml"), "seeds": [0], "output": str(tmp_path / "out"),
             "token_readability": True, "reference": "none", "latency_samples": 0, "eval_batch_size": 8,
             "reliance_conditions": [], "bootstrap_resamples": 100,
             "rows": {"base_none": {"model": "base", "series": "base VLM",
                                    "set": [*tiny, "synthmed.base_vision_steps=0"]},
                      "base_some": {"model": "base", "series": "base VLM",
                                    "set": [*tiny, "synthmed.base_vision_steps=3"]}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["study", "--config", str(path)]) == 0
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    levels = result["shared"]["levels"]
    assert sorted(rows for level in levels.values() for rows in level["rows"]) == ["base_none", "base_some"]
    assert len({level["vlm"] for level in levels.values()}) == 2
    for level in levels.values():
        readability = level["token_readability"]
        assert 0.0 <= readability["ci95"][0] <= readability["accuracy"] <= readability["ci95"][1] <= 1.0
        assert readability["n_test"] == 6 and readability["vlm_base"] == level["vlm"]
    assert "Accuracy against the visibility" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "visibility.png").stat().st_size > 0
    cached = sorted((tmp_path / "cache").glob("readability-*.json"))
    assert len(cached) == 2
    before = [p.stat().st_mtime_ns for p in cached]
    assert main(["study", "--config", str(path), "--prepare"]) == 0  # measured once: read back, not redone
    assert [p.stat().st_mtime_ns for p in cached] == before
