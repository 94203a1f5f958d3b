"""`medsynapse pipeline`: one run file from the training files to the eval summary, killed in and between stages and
rerun, gives the same weights and scores as an uninterrupted run; a finished step is never redone."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import Interrupted
from safetensors.torch import load_file

from medsynapse.cli import main
from medsynapse.runconfig import read_run_config
from medsynapse.steps.chain import run_pipeline


def _run_file(tiny_env, tmp_path, name: str, data_root) -> str:
    run = {"output": str(tmp_path / name),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4, "sampler_width": 32,
                     "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file), "prior_cache": str(tmp_path / f"{name}_cache")},
           "stage1": {"max_steps": 3, "batch_size": 4, "save_every": 1, "answer_types": ["yes_no"]},
           "stage2": {"max_steps": 3, "batch_size": 2, "group_size": 2, "max_new_tokens": 3, "save_every": 1,
                      "answer_types": ["yes_no"], "temperature": 1.0, "top_p": 1.0},
           "stage3": {"max_steps": 3, "batch_size": 2, "max_new_tokens": 3, "save_every": 1,
                      "answer_types": ["yes_no"]},
           "eval": {"benchmarks": ["vqa-rad"], "data_root": str(data_root), "batch_size": 2, "max_new_tokens": 2,
                    "limit": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def _kill_at(step: str, n: int):
    def hook(current: str, done: int) -> None:
        if current == step and done == n:
            raise Interrupted(f"killed in {step} after step {n}")
    return hook


def _outcome(folder):
    weights = {**{f"s2.{k}": v for k, v in load_file(str(folder / "stage2" / "adapter" /
                                                       "adapter_model.safetensors")).items()},
               **{f"s3.{k}": v for k, v in load_file(str(folder / "stage3_student" /
                                                       "autonomous.safetensors")).items()}}
    scores = {row: json.loads((folder / "eval" / row / "vqa-rad" / "metrics.json").read_text())["accuracy"]
              for row in ("base", "stage2", "student")}
    return weights, scores


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from medsynapse.data.sources.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("benchmarks") / "data")


@pytest.mark.slow
def test_a_killed_pipeline_resumes_to_the_same_weights_and_scores(tiny_env, tmp_path, data_root, monkeypatch):
    straight = read_run_config(_run_file(tiny_env, tmp_path, "straight", data_root))
    manifest = run_pipeline(straight)
    assert list(manifest["steps"]) == ["convert", "cache", "stage1", "stage2", "stage3", "eval"]
    assert (tmp_path / "straight" / "eval" / "summary.csv").is_file()
    assert manifest["data_sha256"][str(tiny_env.train_file)]

    killed = read_run_config(_run_file(tiny_env, tmp_path, "killed", data_root))
    with pytest.raises(Interrupted):
        run_pipeline(killed, on_step=_kill_at("stage2", 2))  # inside a stage, after a checkpoint
    with pytest.raises(Interrupted):
        run_pipeline(killed, on_step=_kill_at("stage3", 1))
    between = run_pipeline(killed, until="stage3")  # killed between stages
    assert list(between["steps"]) == ["convert", "cache", "stage1", "stage2", "stage3"]
    run_pipeline(killed)
    weights_a, scores_a = _outcome(tmp_path / "straight")
    weights_b, scores_b = _outcome(tmp_path / "killed")
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(float(v.abs().sum()) > 0 for k, v in weights_a.items() if "lora_B" in k)  # Stage II trained
    assert scores_a == scores_b

    def never(*args, **kwargs):
        raise AssertionError("a finished step must not run again")

    monkeypatch.setattr("medsynapse.steps.chain._run_step", never)
    run_pipeline(killed)  # everything finished: nothing reruns
    changed = read_run_config(_run_file(tiny_env, tmp_path, "killed", data_root), ["stage2.lr=0.5"])
    with pytest.raises(ValueError, match=r"step 'stage2' finished with other settings \(lr differ\)"):
        run_pipeline(changed)


def test_from_reruns_a_step_and_the_later_ones_and_bad_steps_are_refused(tiny_env, tmp_path, data_root):
    path = _run_file(tiny_env, tmp_path, "partial", data_root)
    assert main(["pipeline", "--config", path, "--until", "stage1"]) == 0
    run = read_run_config(path, ["stage1.lr=0.002"])
    with pytest.raises(ValueError, match="stage1"):
        run_pipeline(run, until="stage1")  # the finished Stage I had another lr
    manifest = run_pipeline(run, start="stage1", until="stage1")
    assert manifest["steps"]["stage1"]["settings"]["lr"] == 0.002
    with pytest.raises(ValueError, match="--until 'stage4'"):
        run_pipeline(run, until="stage4")


def _corpora_run(tmp_path, data_root, name: str, **data) -> str:
    run = {"output": str(tmp_path / name), "model": {"vlm": "/nowhere/vlm", "encoder": "/nowhere/encoder"},
           "data": {"data_root": str(data_root), **data}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_the_convert_step_writes_the_training_files_from_corpora_by_name(tmp_path, data_root):
    from medsynapse.data.schema import read_samples
    from medsynapse.data.sources import load_source

    everything = load_source("omnimedvqa", data_root, tmp_path / "img").samples
    assert len(everything) >= 3
    path = _corpora_run(tmp_path, data_root, "corpora",
                        stage1_corpora=[{"name": "pubmedvision"}],
                        stage2_corpora=[{"name": "omnimedvqa", "size": 2}, {"name": "slake-open-train"}],
                        rationale_corpora=[{"name": "omnimedvqa", "size": 1}])
    run = read_run_config(path)
    manifest = run_pipeline(run, until="cache")  # no encoder needed: no prior_cache, so `cache` has nothing to do
    assert list(manifest["steps"]) == ["convert", "cache"]
    stage1, stage2 = tmp_path / "corpora" / "data" / "stage1.jsonl", tmp_path / "corpora" / "data" / "stage2.jsonl"
    from medsynapse.runconfig import resolve, resolve_baseline

    assert resolve(run, "stage1").train_file == str(stage1) and resolve(run, "stage2").train_file == str(stage2)
    assert resolve(run, "stage3").train_file == str(stage2)
    pubmed = load_source("pubmedvision", data_root, tmp_path / "img").samples
    assert [s.id for s in read_samples(stage1)] == [s.id for s in pubmed]
    slake = load_source("slake", data_root, tmp_path / "img", split="train", answer_type="OPEN").samples
    written = [s.id for s in read_samples(stage2)]
    omni_ids = [s.id for s in everything]
    # a seeded subset of 2 OmniMedVQA questions in their original order, then every SLAKE open training question
    assert len(written) == 2 + len(slake) and written[2:] == [s.id for s in slake]
    assert written[:2] == sorted(written[:2], key=omni_ids.index) and set(written[:2]) <= set(omni_ids)
    report = manifest["steps"]["convert"]["report"]["stage2"]["corpora"]
    assert [(c["name"], c["read"], c["kept"]) for c in report] == [("omnimedvqa", len(everything), 2),
                                                                  ("slake-open-train", len(slake), len(slake))]
    assert manifest["data_sha256"][str(stage2)] is not None
    rationale = tmp_path / "corpora" / "data" / "rationale.jsonl"  # the reasoning rows' file, where they read it
    assert resolve_baseline(run, "cot-sft").train_file == str(rationale)
    assert [s.id for s in read_samples(rationale)][0] in omni_ids and len(read_samples(rationale)) == 1
    assert manifest["steps"]["convert"]["report"]["rationale"]["corpora"][0]["kept"] == 1
    # the same seed gives the same subset; another seed (a changed step) is refused unless redone with --from
    again = read_run_config(_corpora_run(tmp_path, data_root, "corpora_again",
                                         stage2_corpora=[{"name": "omnimedvqa", "size": 2}]))
    run_pipeline(again, until="convert")
    assert [s.id for s in read_samples(tmp_path / "corpora_again" / "data" / "stage2.jsonl")] == written[:2]
    with pytest.raises(ValueError, match=r"step 'convert' finished with other settings"):
        run_pipeline(read_run_config(path, ["data.subset_seed=1"]), until="convert")


def test_bad_corpora_are_refused_with_the_key_or_the_record_named(tmp_path, data_root):
    from medsynapse.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.stage1_corpora\[0\]\.name 'pubmed': unknown corpus"):
        read_run_config(_corpora_run(tmp_path, data_root, "typo", stage1_corpora=[{"name": "pubmed"}]))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sise'\]"):
        read_run_config(_corpora_run(tmp_path, data_root, "key", stage1_corpora=[{"name": "slake", "sise": 3}]))
    twice = read_run_config(_corpora_run(tmp_path, data_root, "twice",
                                         stage1_corpora=[{"name": "slake-open-train"}, {"name": "slake-open-train"}]))
    with pytest.raises(ValueError, match=r"sample id '.+' \(field 'id'\) is also in corpus 'slake-open-train'"):
        run_pipeline(twice, until="convert")
    assert not (tmp_path / "twice" / "data" / "stage1.jsonl").exists()  # nothing half-written


def test_subset_is_seeded_ordered_and_complete_when_asked_for_everything():
    from medsynapse.data.corpora import subset
    from medsynapse.data.schema import Sample

    samples = [Sample(id=str(i), images=[], question="q", answer="a", answer_type="open") for i in range(50)]
    picked = subset(samples, 10, seed=3)
    ids = [int(s.id) for s in picked]
    assert len(set(ids)) == 10 and ids == sorted(ids) and picked == subset(samples, 10, seed=3)
    assert picked != subset(samples, 10, seed=4)
    assert subset(samples, 0, 1) == samples and subset(samples, 80, 1) == samples


def test_redo_retrains_a_changed_stage_and_every_later_one(tiny_env, tmp_path, data_root):
    import shutil

    path = _run_file(tiny_env, tmp_path, "redo", data_root)
    run_pipeline(read_run_config(path), until="stage2")
    stage2_weights = tmp_path / "redo" / "stage2" / "adapter" / "adapter_model.safetensors"
    before = stage2_weights.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "redo" / "stage1" / "checkpoints")  # only the manifest can tell Stage I changed
    manifest = run_pipeline(read_run_config(path, ["stage1.lr=0.002"]), until="stage2", on_changed="redo")
    assert manifest["steps"]["stage1"]["settings"]["lr"] == 0.002
    assert stage2_weights.stat().st_mtime_ns != before  # Stage II retrained on the new Stage I
    with pytest.raises(ValueError, match="on_changed 'ignore'"):
        run_pipeline(read_run_config(path), on_changed="ignore")


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_the_eval_step_scores_every_row_with_the_run_files_eval_settings(tmp_path, data_root, monkeypatch, engine):
    import medsynapse.eval.runner as runner
    import medsynapse.eval.summary as summary
    from medsynapse.steps import chain

    calls = []
    monkeypatch.setattr(runner, "evaluate_benchmarks", lambda model, benches, root, out, settings: calls.append(
        (model, out.name, settings)))
    monkeypatch.setattr(summary, "write_summary", lambda *a, **k: "")
    run = read_run_config(_corpora_run(tmp_path, data_root, "eval"), [
        f"eval.engine={engine}", "eval.batch_size=3", "eval.limit=5", "eval.benchmarks=[slake]"])
    chain._run_step(run, "eval", None)
    assert [name for _, name, _ in calls] == ["base", "stage2", "student"]
    assert {(s.engine, s.batch_size, s.limit) for _, _, s in calls} == {(engine, 3, 5)}
