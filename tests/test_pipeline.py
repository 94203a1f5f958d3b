"""`medsynapse pipeline`: one run file from the training files to the scored rows, a one-seed study. Killed in and
between stages and rerun, it gives the same weights and scores as an uninterrupted run; a finished unit or
evaluation is never redone; a changed stage trains a new unit for it and the later stages, the finished ones kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import Interrupted
from safetensors.torch import load_file

from medsynapse.cli import main
from medsynapse.runconfig import read_run_config
from medsynapse.study import pipeline_study, run_pipeline


def _pipeline(path: str, overrides: list[str] | None = None, **kwargs) -> dict:
    return run_pipeline(*pipeline_study(path, overrides), **kwargs)


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


def _killing(monkeypatch, stage: str, n: int) -> None:
    """The study's `stage` units raise Interrupted after their n-th step (a kill; the checkpoint may not exist)."""
    from medsynapse.recipes import registry

    real = registry.recipe

    def recipe(kind: str):
        if kind != stage:
            return real(kind)
        train = real(kind).train()

        def killed(step: int) -> None:
            if step == n:
                raise Interrupted(f"killed in {stage} after step {n}")

        return SimpleNamespace(train=lambda: lambda config: train(config, on_step=killed))

    monkeypatch.setattr(registry, "recipe", recipe)


def _outcome(folder):
    weights = {**{f"s2.{k}": v for k, v in load_file(str(folder / "stage2" / "adapter" /
                                                       "adapter_model.safetensors")).items()},
               **{f"s3.{k}": v for k, v in load_file(str(folder / "stage3_student" /
                                                       "autonomous.safetensors")).items()}}
    scores = {row: json.loads((folder / "cells" / row / "seed_0.json").read_text())["benchmarks"]["vqa-rad"]
              for row in ("base", "stage2", "student")}
    return weights, scores


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from medsynapse.data.sources.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("benchmarks") / "data")


@pytest.mark.slow
def test_a_killed_pipeline_resumes_to_the_same_weights_and_scores(tiny_env, tmp_path, data_root, monkeypatch):
    from medsynapse import study

    straight = _pipeline(_run_file(tiny_env, tmp_path, "straight", data_root))
    assert list(straight["rows"]) == ["base", "stage2", "student"]
    assert (tmp_path / "straight" / "table.md").is_file() and (tmp_path / "straight" / "stage1").is_symlink()
    record = json.loads((tmp_path / "straight" / "prepare.json").read_text())
    assert list(record["steps"]) == ["convert", "cache"] and record["data_sha256"][str(tiny_env.train_file)]

    killed = _run_file(tiny_env, tmp_path, "killed", data_root)
    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        _killing(patch, "stage2", 2)  # inside a stage, after a checkpoint
        _pipeline(killed)
    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        _killing(patch, "stage3", 1)
        _pipeline(killed)
    between = _pipeline(killed, until="stage3")  # killed between stages
    assert [name.split("-")[0] for name in between["units"]] == ["stage1", "stage2", "stage3"]
    _pipeline(killed)
    weights_a, scores_a = _outcome(tmp_path / "straight")
    weights_b, scores_b = _outcome(tmp_path / "killed")
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(float(v.abs().sum()) > 0 for k, v in weights_a.items() if "lora_B" in k)  # Stage II trained
    assert scores_a == scores_b and scores_a["stage2"]["n"] == 2  # eval.limit

    def never(job):
        raise AssertionError(f"a finished job must not run again: {job}")

    monkeypatch.setattr(study, "train_unit", lambda unit: never(unit))
    monkeypatch.setattr(study, "evaluate_model", lambda evaluation: never(evaluation))
    _pipeline(killed)  # everything finished: nothing reruns
    monkeypatch.undo()
    before = sorted(p.name for p in (tmp_path / "killed" / "units").iterdir())
    changed = _pipeline(killed, ["stage2.lr=0.5"], until="stage2")  # a new Stage II; Stage I kept
    after = sorted(p.name for p in (tmp_path / "killed" / "units").iterdir())
    assert set(before) < set(after) and [n.split("-")[0] for n in set(after) - set(before)] == ["stage2"]
    assert (tmp_path / "killed" / "stage2").resolve().name == list(changed["units"])[-1]  # linked to the new one


def test_from_reruns_a_step_and_the_later_ones_and_bad_steps_are_refused(tiny_env, tmp_path, data_root):
    path = _run_file(tiny_env, tmp_path, "partial", data_root)
    assert main(["pipeline", "--config", path, "--until", "stage1"]) == 0
    unit = (tmp_path / "partial" / "stage1").resolve()
    stamp = (unit / "unit.json").stat().st_mtime_ns
    assert unit.parent.name == "units" and (unit / "unit.json").is_file()
    again = _pipeline(path, until="stage1")  # finished: kept
    assert list(again["units"]) == [unit.name] and (unit / "unit.json").stat().st_mtime_ns == stamp
    _pipeline(path, start="stage1", until="stage1")  # redone from scratch: the same unit, trained again
    assert (unit / "unit.json").stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="--until 'stage4'"):
        _pipeline(path, until="stage4")
    with pytest.raises(ValueError, match="--from 'summary'"):
        _pipeline(path, start="summary")


def test_a_stage_folder_of_the_earlier_layout_is_left_alone(tiny_env, tmp_path, data_root, capsys):
    path = _run_file(tiny_env, tmp_path, "earlier", data_root)
    (tmp_path / "earlier" / "stage1").mkdir(parents=True)
    (tmp_path / "earlier" / "stage1" / "mine.txt").write_text("kept")
    result = _pipeline(path, until="stage1")
    unit = tmp_path / "earlier" / "units" / list(result["units"])[0]
    assert (unit / "unit.json").is_file() and not (tmp_path / "earlier" / "stage1").is_symlink()
    assert (tmp_path / "earlier" / "stage1" / "mine.txt").read_text() == "kept"
    assert f"earlier layout, left as it is (the model: {unit})" in capsys.readouterr().out


def test_under_torchrun_a_study_runs_its_jobs_in_its_processes(tmp_path, data_root, monkeypatch):
    from medsynapse import study as driver
    from medsynapse.config import ConfigError

    monkeypatch.setattr(driver, "processes", lambda: SimpleNamespace(num_processes=2, is_main_process=True))
    study, raw, source = pipeline_study(_corpora_run(tmp_path, data_root, "ranks"))
    for workers, launcher in ((2, "local"), (1, "submitit-local")):
        study.workers, study.launcher = workers, launcher
        with pytest.raises(ConfigError, match=rf"under torchrun \(2 processes\).+workers 1 and launcher local, "
                                              rf"not {workers} / {launcher}"):
            driver.run_study(study, raw, source)
    assert not (tmp_path / "ranks").exists()  # refused before anything is written


def test_a_process_other_than_the_main_waits_for_the_main_processs_result(tmp_path):
    """Under torchrun the main process writes an evaluation's result.json (after its reliance report, alone); the
    others watch for the file with this evaluation's settings, not for a stale one of other settings."""
    import threading
    import time

    from medsynapse.study import Evaluation, _result_when_written

    job = Evaluation("m", "dir", str(tmp_path), ["synthmed"], "data", 8, None, None, "zero", ["zeroed"], 0)
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"accuracy": 0.1, "settings": {**job.settings(), "eval_batch_size": 4}}))

    def main_process() -> None:
        time.sleep(1.5)
        path.write_text(json.dumps({"accuracy": 0.9, "settings": job.settings()}))

    writer = threading.Thread(target=main_process)
    began = time.perf_counter()
    writer.start()
    assert _result_when_written(path, job)["accuracy"] == 0.9 and time.perf_counter() - began >= 1.5
    writer.join()


def test_the_pipeline_command_prints_the_studys_table(tiny_env, tmp_path, data_root, capsys):
    path = _run_file(tiny_env, tmp_path, "printed", data_root)
    assert main(["pipeline", "--config", path]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "printed" / "table.md").read_text()
    assert table in out and "| Stage III student (encoder-free) | direct |" in table
    assert f"pipeline: {tmp_path / 'printed'}/table.md" in out


def test_the_cache_step_runs_again_when_its_settings_change_and_is_kept_otherwise(tmp_path, data_root, monkeypatch):
    """The prior features are keyed by encoder and image bytes inside the cache, so a changed encoder or cache folder
    simply encodes again (no refusal); the same settings encode nothing."""
    import medsynapse.recipes.priors as priors
    from medsynapse.steps.prepare import prepare_run

    calls = []
    monkeypatch.setattr(priors, "cache_features", lambda encoder, file, cache: calls.append((encoder, cache)))
    path = _corpora_run(tmp_path, data_root, "cached", stage1_corpora=[{"name": "pubmedvision"}])
    run = read_run_config(path, [f"data.prior_cache={tmp_path / 'features'}"])
    record = prepare_run(run)
    assert calls == [("/nowhere/encoder", str(tmp_path / "features"))] and record["config"] == path
    prepare_run(run)
    assert len(calls) == 1  # the same settings: kept
    prepare_run(read_run_config(path, [f"data.prior_cache={tmp_path / 'features'}", "model.encoder=/elsewhere"]))
    assert calls[-1] == ("/elsewhere", str(tmp_path / "features")) and len(calls) == 2


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
    manifest = _pipeline(path, until="cache")["prepare"]  # no encoder needed: no prior_cache, nothing to cache
    assert list(manifest) == ["convert", "cache"]
    record = json.loads((tmp_path / "corpora" / "prepare.json").read_text())
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
    report = manifest["convert"]["report"]["stage2"]["corpora"]
    assert [(c["name"], c["read"], c["kept"]) for c in report] == [("omnimedvqa", len(everything), 2),
                                                                  ("slake-open-train", len(slake), len(slake))]
    assert record["data_sha256"][str(stage2)] is not None and record["steps"] == manifest
    rationale = tmp_path / "corpora" / "data" / "rationale.jsonl"  # the reasoning rows' file, where they read it
    assert resolve_baseline(run, "cot-sft").train_file == str(rationale)
    assert [s.id for s in read_samples(rationale)][0] in omni_ids and len(read_samples(rationale)) == 1
    assert manifest["convert"]["report"]["rationale"]["corpora"][0]["kept"] == 1
    # the same seed gives the same subset; another seed (a changed step) is refused unless redone with --from
    _pipeline(_corpora_run(tmp_path, data_root, "corpora_again", stage2_corpora=[{"name": "omnimedvqa", "size": 2}]),
              until="convert")
    assert [s.id for s in read_samples(tmp_path / "corpora_again" / "data" / "stage2.jsonl")] == written[:2]
    with pytest.raises(ValueError, match=r"step 'convert' finished with other settings \(subset_seed differ\)"):
        _pipeline(path, ["data.subset_seed=1"], until="convert")
    reseeded = _pipeline(path, ["data.subset_seed=1"], start="convert", until="convert")["prepare"]
    assert reseeded["convert"]["settings"]["subset_seed"] == 1 and "cache" not in reseeded


def test_bad_corpora_are_refused_with_the_key_or_the_record_named(tmp_path, data_root):
    from medsynapse.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.stage1_corpora\[0\]\.name 'pubmed': unknown corpus"):
        read_run_config(_corpora_run(tmp_path, data_root, "typo", stage1_corpora=[{"name": "pubmed"}]))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sise'\]"):
        read_run_config(_corpora_run(tmp_path, data_root, "key", stage1_corpora=[{"name": "slake", "sise": 3}]))
    twice = _corpora_run(tmp_path, data_root, "twice",
                         stage1_corpora=[{"name": "slake-open-train"}, {"name": "slake-open-train"}])
    with pytest.raises(ValueError, match=r"sample id '.+' \(field 'id'\) is also in corpus 'slake-open-train'"):
        _pipeline(twice, until="convert")
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


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_the_eval_step_scores_every_row_with_the_run_files_eval_settings(tmp_path, data_root, monkeypatch, engine):
    import medsynapse.eval.runner as runner
    from medsynapse import study as driver

    calls = []

    def harness(model, benches, root, out, settings):
        calls.append((model, out.parent.name, benches, root, settings))
        raise Interrupted  # what it was asked is all this test reads

    monkeypatch.setattr(runner, "evaluate_benchmarks", harness)
    study, raw, source = pipeline_study(_corpora_run(tmp_path, data_root, "eval"), [
        f"eval.engine={engine}", "eval.batch_size=3", "eval.limit=5", "eval.benchmarks=[slake]",
        "eval.max_new_tokens=7", f"eval.data_root={data_root}"])
    plan = driver.plan_study(study, raw, source, None, driver._eval_source(study, read_run_config(source)),
                             tmp_path / "eval")
    for evaluation in plan.evaluations.values():
        with pytest.raises(Interrupted):
            driver.evaluate_model(evaluation)
    assert [name.split("-")[0] for _, name, *_ in calls] == ["base", "stage2", "stage3"]
    assert calls[0][0] == "/nowhere/vlm" and {(tuple(b), r) for _, _, b, r, _ in calls} == {(("slake",),
                                                                                           str(data_root))}
    assert {(s.engine, s.batch_size, s.limit, s.max_new_tokens) for *_, s in calls} == {(engine, 3, 5, 7)}
