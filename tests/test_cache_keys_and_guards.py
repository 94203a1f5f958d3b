"""Behaviours the every-package mutation sample (`make mutation-sample`) found untested: the demo's cache keys follow
exactly what shapes each shared folder, a stage section's memory bound reads the VLM its own `model` folder names, and
the app keeps Gradio's analytics off."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from conftest import run_file

from medsynapse.cli import main
from medsynapse.steps.synthmed import DemoConfig, shared_folders
from medsynapse.values import MEMORY_ENV

# each setting -> the shared folders whose content it shapes (the others must keep their key, so nothing is rebuilt)
SHAPES = {
    "data_seed": {"data", "vlm_init", "vlm_base", "encoder"},
    "image_size": {"data", "vlm_init", "vlm_base", "encoder"},
    "train_images": {"data", "vlm_init", "vlm_base", "encoder"},
    "test_images": {"data", "vlm_init", "vlm_base", "encoder"},
    "vlm_resolution": {"vlm_init", "vlm_base"},
    "base_steps": {"vlm_base"},
    "base_vision_steps": {"vlm_base"},
    "base_grounding_weight": {"vlm_base"},
    "encoder_steps": {"encoder"},
    "seed": set(),  # the training seed: every seed shares the cache
}


@pytest.mark.parametrize("setting", sorted(SHAPES))
def test_each_cached_folder_changes_key_exactly_when_what_shapes_it_changes(setting, tmp_path):
    config = DemoConfig(cache_dir=str(tmp_path / "cache"))
    changed = replace(config, **{setting: type(getattr(config, setting))(getattr(config, setting) * 2 + 1)})
    before, after = shared_folders(config), shared_folders(changed)
    assert {name for name in before if before[name] != after[name]} == SHAPES[setting]


def test_a_stage_section_is_bounded_by_the_vlm_its_model_folder_holds(tmp_path, capsys, monkeypatch):
    """A Stage II section that names its own `model` folder (the model section names none): an 8B-sized config
    there is refused on 24 GiB."""
    monkeypatch.setenv(MEMORY_ENV, "24")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    big = tmp_path / "big_vlm"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 4096, "num_hidden_layers": 36,
                                                                 "vocab_size": 151936}}))
    flat = run_file(tmp_path / "stage2.yaml", "stage2", dict(
        model=str(big), train_file=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "out"), use_memory=False,
        lambda_causal=0, batch_size=64, group_size=16, max_new_tokens=512))
    capsys.readouterr()
    assert main(["train", "stage2", "--config", str(flat)]) == 2
    err = capsys.readouterr().err
    assert "stage2.yaml." in err and "one training step needs at least" in err and "big_vlm" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_app_turns_gradio_analytics_off_unless_the_user_chose(monkeypatch):
    from medsynapse import app

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    app.build({})
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # the user's own choice stands
    app.build({})
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "True"


@pytest.mark.parametrize(("successes", "n"), [(0, 5), (3, 10), (70, 100), (149, 150), (150, 150)])
def test_the_probes_wilson_interval_equals_scipys(successes, n):
    from scipy.stats import binomtest

    from medsynapse.eval.diagnostics import wilson_interval

    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected.low, abs=1e-6) and high == pytest.approx(expected.high, abs=1e-6)


def test_checkpoints_beyond_keep_are_removed_oldest_first(tmp_path):
    import torch

    from medsynapse.recipes.trainer import CHECKPOINTS, save_checkpoint

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, module, optimizer, scheduler, keep=2)
    kept = sorted(p.name for p in (tmp_path / CHECKPOINTS).glob("step_*"))
    assert kept == ["step_0000003", "step_0000004"]


def test_unknown_loader_options_are_refused_before_anything_is_read(tmp_path):
    from medsynapse.eval.runner import check_inputs

    with pytest.raises(ValueError, match=r"pathvqa: unknown option\(s\) \['no_such_option'\]"):
        check_inputs(str(tmp_path / "no_model"), ["pathvqa"], {"pathvqa": {"no_such_option": 1}})


@pytest.mark.parametrize("word", ["or", "and", "nor", "but", "is", "was", "are", "seems", "appears", "vs", "versus",
                                  "then", "because", "as", "would", "should", "could", "might", "may", "will", "can",
                                  "fits", "matches", "best"])
def test_a_capital_a_before_a_verb_or_conjunction_is_option_a_not_the_article(word):
    from medsynapse.answers import extract_option

    options = {"A": "pneumothorax", "B": "effusion", "C": "mass"}
    assert extract_option(f"A {word} the finding here.", options).answer == "A"
    assert extract_option(f"A {word}", options).answer == "A"


def test_the_diagnostics_tables_show_each_probe_that_ran_and_only_those():
    from medsynapse.eval.report import diagnostics_tables

    text = diagnostics_tables({
        "leak_probe": {"memory": 0.9, "counterfactual": 0.3, "chance": 0.25},
        "leak_probe_zero": {"memory": None, "counterfactual": 0.26, "chance": 0.25},
        "readability": {"vlm_tokens": 0.83},
        "reliance": {"teacher": {"as_is": 0.97, "zeroed": 0.6}}})
    lines = text.splitlines()
    assert "| memory (demo intervention) | 0.900 | 0.250 |" in lines
    assert "| counterfactual (demo intervention) | 0.300 | 0.250 |" in lines
    assert "| counterfactual (paper's zero intervention) | 0.260 | 0.250 |" in lines
    assert not any(line.startswith("| memory (paper's zero") for line in lines)  # that probe did not run
    assert "| vlm_tokens | 0.830 |" in lines
    for header, rule in zip(lines, lines[1:], strict=False):  # every table's rule has its header's columns
        if rule.startswith("|---"):
            assert rule.count("|") == header.count("|"), (header, rule)


@pytest.mark.parametrize(("split", "published"), [("train", "train"), ("validation", "val"), ("test", "test")])
def test_pathvqa_pickles_are_read_for_every_split_under_their_published_folder_names(split, published, tmp_path):
    import pickle
    import shutil

    from medsynapse.data.sources import load_source
    from medsynapse.data.sources.fixtures import pathvqa

    pathvqa(tmp_path)
    shutil.rmtree(tmp_path / "path_vqa")  # only the original pickles are left
    test_qas, test_images = tmp_path / "pvqa" / "qas" / "test", tmp_path / "pvqa" / "images" / "test"
    records = pickle.loads((test_qas / "test_qa.pkl").read_bytes())
    expected = [s.question for s in load_source("pathvqa", tmp_path, tmp_path / "cache0", split="test").samples]
    if published != "test":
        qas, images = tmp_path / "pvqa" / "qas" / published, tmp_path / "pvqa" / "images" / published
        qas.mkdir(parents=True)
        images.mkdir(parents=True)
        renamed = [{**r, "image": r["image"].replace("test_", f"{published}_")} for r in records]
        (qas / f"{published}_qa.pkl").write_bytes(pickle.dumps(renamed))
        for r, new in zip(records, renamed, strict=True):
            shutil.copy(test_images / f"{r['image']}.jpg", images / f"{new['image']}.jpg")
        shutil.rmtree(test_qas)
    samples = load_source("pathvqa", tmp_path, tmp_path / "cache", split=split).samples
    assert [s.question for s in samples] == expected and expected


def test_pubmedvision_is_found_under_its_published_folder_name(tmp_path):
    from medsynapse.data.sources import load_source
    from medsynapse.data.sources.fixtures import pubmedvision

    pubmedvision(tmp_path)
    ours = load_source("pubmedvision", tmp_path, tmp_path / "cache").samples
    (tmp_path / "pubmedvision").rename(tmp_path / "PubMedVision")
    published = load_source("pubmedvision", tmp_path, tmp_path / "cache2").samples
    assert [s.question for s in published] == [s.question for s in ours] and ours


def test_only_the_writer_of_a_predictions_file_cuts_its_torn_last_line(tmp_path):
    """Rank 1 of 2 reads the merged file (rank 0's, maybe being written) and its own part: only its own is repaired."""
    from types import SimpleNamespace

    from medsynapse.eval.runner import PREDICTIONS, BenchmarkRun, EvalSettings

    benchmark = SimpleNamespace(samples=[], name="b", source="s", closed_definition="c", max_new_tokens=8)
    run = BenchmarkRun(None, benchmark, tmp_path, EvalSettings(), "model", rank=1, world=2)
    merged, own = tmp_path / PREDICTIONS, tmp_path / "predictions.part1.jsonl"
    merged.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"')  # rank 0 mid-write
    own.write_text('{"id": "d"}\n{"id": "e"')  # this rank was killed mid-write
    assert [line["id"] for line in run.all_lines()] == ["a", "b", "d"]
    assert merged.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"'  # not this rank's to cut
    assert own.read_text() == '{"id": "d"}\n'


def test_the_summary_plot_draws_each_runs_accuracy_per_benchmark_and_no_bar_for_a_missing_one(tmp_path, monkeypatch):
    import math

    import matplotlib.axes

    from medsynapse.eval import summary

    drawn = []
    original = matplotlib.axes.Axes.bar

    def recording_bar(self, *args, **kwargs):
        bars = original(self, *args, **kwargs)
        drawn.append((kwargs.get("label"), [patch.get_height() for patch in bars]))
        return bars

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    runs = {"teacher": {"vqa_rad": {"accuracy": 0.5}, "slake": {"accuracy": 0.25}},
            "student": {"vqa_rad": {"accuracy": 0.75}, "slake": {"accuracy": None}}}
    summary.plot(runs, tmp_path / "plot.png")
    columns = summary._columns(runs)
    expected = {label: [100 * m[c]["accuracy"] if m[c]["accuracy"] is not None else math.nan for c in columns]
                for label, m in runs.items()}
    assert [label for label, _ in drawn] == ["teacher", "student"]
    for label, heights in drawn:
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(heights, expected[label], strict=True))
    assert (tmp_path / "plot.png").stat().st_size > 1000
