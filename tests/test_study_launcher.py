"""A study's jobs through submitit (`launcher: submitit-local | slurm`, launch.py): the same study.json as the local
launcher, a preempted unit requeued by submitit that resumes from its checkpoint to the weights of an uninterrupted
run, the SLURM batch file the study file's `cluster:` parameters give, and those parameters checked before anything
runs."""

from __future__ import annotations

import os
import signal
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_study import TWO_ROWS, _differences, _files, _without_timing

from medsynapse.config import ConfigError
from medsynapse.launch import ClusterJob, check_cluster, make_executor
from medsynapse.study import plan_study, prepare, read_study, run_study, train_unit

pytestmark = pytest.mark.slow


def test_a_study_through_submitit_gives_the_local_launchers_study_json(tiny_env, tmp_path):
    path = _files(tiny_env, tmp_path, TWO_ROWS, seeds=[0], latency_samples=0)
    local = run_study(*read_study(path, overrides=[f"output={tmp_path / 'local'}"]))
    study, raw, source = read_study(path, overrides=[f"output={tmp_path / 'submitit'}", "launcher=submitit-local",
                                                     "workers=2", "cluster={timeout_min: 20}"])
    through_submitit = run_study(study, raw, source)
    assert through_submitit["study"]["launcher"] == "submitit-local" and local["study"]["launcher"] == "local"
    for result in (local, through_submitit):  # how the jobs ran is echoed with the study's settings
        for key in ("launcher", "workers", "cluster"):
            result["study"].pop(key)
    assert _without_timing(through_submitit) == _without_timing(local), _differences(
        _without_timing(through_submitit), _without_timing(local))
    logs = sorted((tmp_path / "submitit" / "submitit").glob("*_log.out"))
    assert len(logs) == 4  # 2 units (Stage I, Stage II) and 2 evaluations, each its own submitit job
    assert local["units"]["count"] == 2


def logged_steps(events: Path) -> set[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {e.step for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)}


def test_a_preempted_unit_is_requeued_and_resumes_from_its_checkpoint(tiny_env, tmp_path):
    path = _files(tiny_env, tmp_path, {"stage1_only": {"model": "stage1"}}, seeds=[0], latency_samples=0)
    study, raw, source = read_study(path, overrides=[f"output={tmp_path / 'preempted'}", "launcher=submitit-local"])
    raw["stage1"] = {**raw["stage1"], "max_steps": 24}  # long enough to be interrupted after its first checkpoint
    shared, eval_source, _ = prepare(study, raw, source)
    (unit,) = plan_study(study, raw, source, shared, eval_source, tmp_path / "preempted").units.values()
    executor = make_executor("submitit-local", tmp_path / "jobs", {"timeout_min": 20})
    job = executor.submit(ClusterJob(train_unit, unit, threads=1))
    first = Path(unit.config.output_dir) / "checkpoints" / "step_0000001"
    deadline = time.time() + 240
    while time.time() < deadline and not (first / "state.json").is_file() and not job.done():
        time.sleep(0.05)
    assert (first / "state.json").is_file() and not job.done(), job.stderr()
    # SLURM's warning before it preempts a job: SIGUSR2 to the job's processes (the local controller forwards only
    # SIGTERM, so the signal goes to its task, the process that trains)
    controller = job._process.pid
    (task,) = (int(p) for p in Path(f"/proc/{controller}/task/{controller}/children").read_text().split())
    os.kill(task, signal.SIGUSR2)
    info = job.result()  # requeued by submitit, then finished
    assert info["unit"] == unit.name and (Path(unit.config.output_dir) / "unit.json").is_file()
    log = job.stdout() or ""
    assert "this job is preempted" in log and "Requeued job" in log and log.count("Loading pickle") == 2, log
    # resumed, not redone: the requeued run's TensorBoard log starts past step 0 and ends at the last step
    first_run, requeued_run = (logged_steps(f) for f in sorted(
        (Path(unit.config.output_dir) / "stage1").glob("events.out.tfevents.*"), key=lambda f: float(
            f.name.split(".")[3])))
    assert 0 in first_run and 0 not in requeued_run and max(requeued_run) == 23, (first_run, requeued_run)

    straight = replace(unit, config=replace(unit.config, output_dir=str(tmp_path / "straight")))
    executor.submit(ClusterJob(train_unit, straight, threads=1)).result()  # the same job, not interrupted
    for name in ("sampler.safetensors",):
        resumed, reference = (load_file(str(Path(folder) / name)) for folder in (unit.config.output_dir,
                                                                                   tmp_path / "straight"))
        assert resumed.keys() == reference.keys() and resumed
        assert all((resumed[k] == reference[k]).all() for k in resumed)


def test_the_cluster_parameters_make_the_slurm_batch_file(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    for command in ("srun", "sbatch"):  # a SLURM executor is only built where srun exists; nothing is submitted
        (fake / command).write_text("#!/bin/sh\nexit 1\n")
        (fake / command).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor("slurm", tmp_path / "jobs", {"slurm_partition": "gpu", "gpus_per_node": 8,
                                                           "tasks_per_node": 8, "timeout_min": 600})
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@"):
        assert line in text, text


@pytest.mark.parametrize(("parameters", "message"), [
    ({"gpus_per_nod": 8}, "s.yaml.cluster: Unknown executor 'gpus' in parameter 'gpus_per_nod'"),
    ({"slurm_partitio": "gpu"}, "s.yaml.cluster: Unknown argument 'partitio' for executor 'slurm'"),
    ({"timeout_min": "ten"}, 's.yaml.cluster: Parameter "timeout_min" expected type'),
])
def test_unknown_or_mistyped_cluster_parameters_are_one_line(parameters, message):
    with pytest.raises(ConfigError) as raised:
        check_cluster(parameters, "s.yaml")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    check_cluster({"slurm_partition": "gpu", "gpus_per_node": 8, "timeout_min": 600}, "s.yaml")


def test_the_study_file_checks_its_launcher_before_anything_runs(tiny_env, tmp_path):
    path = _files(tiny_env, tmp_path, TWO_ROWS)
    with pytest.raises(ConfigError, match=r"study\.yaml\.cluster: Unknown argument 'partitio'"):
        read_study(path, overrides=["launcher=slurm", "cluster={slurm_partitio: gpu}"])
    with pytest.raises(ConfigError, match=r"study\.yaml\.cluster: submitit's parameters, for launcher slurm"):
        read_study(path, overrides=["cluster={timeout_min: 10}"])
    with pytest.raises(ConfigError, match=r"study\.yaml\.launcher"):
        read_study(path, overrides=["launcher=pbs"])
