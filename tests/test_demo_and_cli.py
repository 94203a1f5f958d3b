"""The demo writes the promised files with the promised shape; the CLI drives training and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_file

from medsynapse.cli import main


@pytest.mark.slow
def test_demo_small_run_writes_results_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--set",
            "train_images=16", "test_images=4", "base_steps=4", "base_vision_steps=4", "encoder_steps=4",
            "stage1.max_steps=3",
            "stage1.batch_size=4", "stage2.max_steps=2", "stage2.batch_size=2", "stage3.max_steps=2",
            "stage3.batch_size=4", "efficiency_samples=1",
            "eval_batch_size=8"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 0
    assert results["splits"]["train"] > 0 and results["splits"]["test"] > 0
    for stage in ("base", "stage1"):
        row = results["stages"][stage]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == results["splits"]["test"]
    assert 0.0 <= results["stages"]["stage1"]["counterfactual_accuracy"] <= 1.0
    stage2 = results["stages"]["stage2"]
    assert {"accuracy", "n", "counterfactual_accuracy", "mean_causal_reward_correct",
            "mean_causal_reward_wrong"} <= set(stage2)
    assert (out / "stage2" / "adapter" / "adapter_model.safetensors").is_file()
    from medsynapse.runconfig import read_run_config, resolve  # the written run file names this run's folders

    run = read_run_config(out / "run.yaml")
    stage1, stage2 = resolve(run, "stage1"), resolve(run, "stage2")
    assert Path(stage1.vlm).is_dir() and Path(stage1.encoder).is_dir() and Path(stage1.train_file).is_file()
    assert stage1.max_steps == 3 and stage1.n_memory == 16  # configs/synthmed.yaml's
    assert stage2.causal_form == "centred"
    assert stage2.model == stage1.output_dir
    # every row ran through the study (the one driver): its units, evaluations, cells and table in the output
    # folder, each row's model linked under its name
    study = json.loads((out / "study.json").read_text())
    assert sorted(study["rows"]) == ["base", "grpo_only", "sft", "stage1", "stage2", "stage3_student"]
    for row in ("stage1", "stage2", "stage3_student", "sft", "grpo_only"):
        cell = study["rows"][row]["cells"]["0"]
        assert (out / row).resolve() == (out / "units" / cell["units"][-1]).resolve(), row
        assert results["stages"][row]["accuracy"] == cell["accuracy"], row
    assert study["rows"]["stage3_student"]["cells"]["0"]["units"][:2] == study["rows"]["stage2"]["cells"]["0"]["units"]
    assert "| stage1 |" in (out / "table.md").read_text()
    for name in ("stage3_teacher", "stage3_student", "sft", "grpo_only"):
        assert 0.0 <= results["stages"][name]["accuracy"] <= 1.0
        assert set(results["stages"][name]["by_question_type"]) <= {"presence", "count", "location", "size",
                                                                     "density"}
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "grpo_only" / "sampler.safetensors").exists()  # the controls have no memory
    diagnostics = results["diagnostics"]
    assert {"memory", "counterfactual", "chance"} <= set(diagnostics["leak_probe"])
    for stage in ("stage1", "stage2", "stage3_student"):
        assert {"as_is", "zeroed", "mean", "shuffled", "counterfactual", "noise",
                "collapse_cosine"} <= set(diagnostics["reliance"][stage])
    assert diagnostics["reliance"]["stage3_student"]["counterfactual"] is None  # a student has no M'
    assert results["claims"]["student_latency_ratio"] > 0
    for name in ("base", "stage3_teacher", "stage3_student"):
        assert results["efficiency"][name]["ms_per_sample"] > 0 and results["efficiency"][name]["peak_mem_mb"] > 0
    assert (out / "stage3_student" / "autonomous.safetensors").is_file()
    assert results["timing_s"]["total"] > 0
    assert "| stage1 |" in (out / "report.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 1000
    lines = (out / "predictions_stage1.jsonl").read_text().splitlines()
    assert len(lines) == results["splits"]["test"]
    assert "| base |" in capsys.readouterr().out
    # a second run with the same settings into a new folder reuses the cached data, VLMs and encoder, and every
    # number and every answer is bit-identical to the first run's (training, sampling and evaluation are seeded;
    # the timing runs, which change no number, are left out)
    again_out = tmp_path / "demo_again"
    assert main([*args[:2], str(again_out), *args[3:], "efficiency_samples=0"]) == 0
    again = json.loads((again_out / "results.json").read_text())
    assert again["timing_s"]["base_prep"] < 1.0 and again["timing_s"]["encoder"] < 1.0
    assert without_timing(again) == without_timing(results)
    for name in ("predictions_stage1.jsonl", "predictions_stage2.jsonl", "predictions_stage3_student.jsonl"):
        assert (again_out / name).read_text() == (out / name).read_text(), name
    for weights in ("stage1/sampler.safetensors", "stage2/adapter/adapter_model.safetensors",
                    "stage3_student/autonomous.safetensors"):
        assert (again_out / weights).read_bytes() == (out / weights).read_bytes(), weights
    # the same settings into the same folder keep the finished units (the study's rule: keyed by their settings);
    # a changed Stage III setting trains another Stage III only, from the same Stage II
    finished = {s: (out / s / "unit.json").stat().st_mtime_ns for s in ("stage1", "stage2", "stage3_student")}
    capsys.readouterr()
    assert main([*args, "stage3.lr=0.002", "diagnostics=false", "efficiency_samples=0", "ablations=true"]) == 0
    assert "; 9 already finished" in capsys.readouterr().out  # 5 units and 4 evaluations of the first run
    ablated = json.loads((out / "results.json").read_text())["stages"]  # each ablation trained into its own folder
    for name, weights in (("stage2_lambda0", "adapter/adapter_model.safetensors"),
                          ("stage2_paper_eq5", "adapter/adapter_model.safetensors"),
                          ("stage2_ranked", "adapter/adapter_model.safetensors"),
                          ("stage3_jsd_only", "autonomous.safetensors")):
        assert (out / name / weights).is_file() and 0.0 <= ablated[name]["accuracy"] <= 1.0, name
    assert {s: (out / s / "unit.json").stat().st_mtime_ns for s in ("stage1", "stage2")} == \
        {s: finished[s] for s in ("stage1", "stage2")}
    assert (out / "stage3_student" / "unit.json").stat().st_mtime_ns != finished["stage3_student"]
    state = next((out / "stage3_student" / "checkpoints").glob("*/state.json"))
    assert json.loads(state.read_text())["settings"]["lr"] == 0.002


def without_timing(results: dict) -> dict:
    """results.json without what measures time (timings, latency, memory) rather than what the model does."""
    dropped = {"timing_s", "efficiency", "config"}
    kept = {k: v for k, v in results.items() if k not in dropped}
    kept["claims"] = {k: v for k, v in kept.get("claims", {}).items() if "latency" not in k}
    kept["stage2_causal_reward"] = {k: v for k, v in kept.get("stage2_causal_reward", {}).items()
                                    if "seconds" not in k}
    return kept


def test_cli_train_stage1_and_predict(tiny_env, tmp_path, capsys):
    config = run_file(tmp_path / "stage1.yaml", "stage1", dict(
        vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
        output_dir=str(tmp_path / "s1"), n_memory=4, sampler_width=32, batch_size=4))
    assert main(["train", "stage1", "--config", str(config), "--set", "stage1.max_steps=2"]) == 0
    assert (tmp_path / "s1" / "sampler.safetensors").is_file()
    image = next((tiny_env.root / "data" / "images").glob("test_*.png"))
    question = "Is there a lesion in this image? Answer yes or no."
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "s1"), "--image", str(image), "--question", question,
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    # the CLI prints exactly the model's own greedy answer for that image and question
    from medsynapse.data.images import load_image
    from medsynapse.model.medsynapse import MedSynapseV

    model = MedSynapseV.from_pretrained(str(tmp_path / "s1"), merge_adapter=True)
    expected = model.answer([load_image(image)], [question], max_new_tokens=3)[0]
    assert printed == expected and len(model.processor.tokenizer(expected)["input_ids"]) <= 3 + 1


@pytest.mark.slow
def test_demo_over_seeds_summarises_and_reuses_finished_seeds(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = ["demo", "--output", str(out), "--cache-dir", str(cache), "--seeds", "0,1", "--set", "train_images=12",
            "test_images=4", "base_steps=2", "base_vision_steps=2", "encoder_steps=2", "stage1.max_steps=1",
            "stage1.batch_size=4", "stage2.max_steps=1", "stage2.batch_size=2", "stage3.max_steps=1",
            "stage3.batch_size=4", "controls=false", "diagnostics=false", "efficiency_samples=0", "eval_batch_size=8"]
    assert main(args) == 0
    per_seed = [json.loads((out / f"seed_{k}" / "results.json").read_text()) for k in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert per_seed[0]["efficiency"] == {} and not any(k.startswith("efficiency") for k in per_seed[0]["timing_s"])
    study = json.loads((out / "study.json").read_text())  # the rows over seeds: the study's summary
    row = study["rows"]["stage1"]["summary"]["accuracy"]
    values = [r["stages"]["stage1"]["accuracy"] for r in per_seed]
    assert row["values"] == values and abs(row["mean"] - sum(values) / 2) < 1e-12
    assert row["ci95"][0] <= row["mean"] <= row["ci95"][1]
    assert study["rows"]["stage1"]["comparison"]["delta"] == row["mean"] - study["rows"]["stage2"]["summary"][
        "accuracy"]["mean"]
    assert "± " in (out / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())  # what the study does not compute, over seeds
    assert "stages" not in summary and summary["seeds"] == [0, 1] and "table.md" in summary["rows"]
    assert "table.md" in (out / "summary.md").read_text()
    # rerun: finished units, evaluations and seed reports are reused, not redone (their files are untouched)
    stamp = (out / "seed_0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "seed_0" / "results.json").stat().st_mtime_ns == stamp
    printed = capsys.readouterr().out
    assert "13 already finished" in printed and "seed 1's report already written" in printed


def test_the_shipped_synthmed_run_file_is_the_demos_and_is_checked(tmp_path, capsys):
    from medsynapse.config import ConfigError
    from medsynapse.runconfig import read_run_config, resolve
    from medsynapse.steps.synthmed import demo_settings

    root = Path(__file__).resolve().parents[1]
    run = read_run_config(root / "configs" / "synthmed.yaml")
    settings = demo_settings(run)
    assert settings.train_images == 1000 and settings.controls and not settings.ablations
    stage2 = resolve(run, "stage2")
    assert (stage2.causal_form, stage2.intervention, stage2.lora_r) == ("centred", "reference", 16)
    assert resolve(run, "stage3").model == str(Path(run.output) / "stage2")
    assert main(["config", "show", str(root / "configs" / "synthmed.yaml"), "--set", "synthmed.seeds=[0,1]"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["synthmed"]["seeds"] == [0, 1] and shown["synthmed"]["efficiency_samples"] == 60  # defaults too
    for override, words in (("model.vlm=/models/x", r"model\.vlm.*leave it empty"),
                            ("synthmed.train_imgs=3", r"synthmed.*train_imgs")):
        with pytest.raises(ConfigError, match=words):
            demo_settings(read_run_config(root / "configs" / "synthmed.yaml", [override]))
