"""Where a study's jobs run (`launcher:` in a study file): `local`, the study's own worker processes (study.run_jobs),
or a submitit executor, each job (a unit's training, a model's evaluation) one submitit job:
- `slurm`: one SLURM job per study job, with the study file's `cluster:` parameters (submitit's AutoExecutor names:
  `timeout_min`, `gpus_per_node`, `tasks_per_node`, `cpus_per_task`, `mem_gb`, `nodes`, `slurm_partition`,
  `slurm_account`, ...). A job asking for several tasks runs one process per task with the variables torchrun sets
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: submitit's TorchDistributedEnvironment), so its training
  or evaluation is distributed as under `torchrun` (docs/distributed.md);
- `submitit-local`: submitit's local executor, the same code path with jobs as processes on this machine (what the
  tests run; also a way to keep a study's jobs apart from the study's process).
A job preempted or out of time is requeued by submitit (`Checkpointable`: the same call again) and continues where it
stopped: a unit trains with `resume: true` from its newest checkpoint, the benchmark runner skips the questions it
already answered. Why submitit rather than a home-made sbatch writer: it writes the batch files, requeues on
preemption and time-out, pickles the call and its result, and its local executor runs the same path here.
No driver is imported here (tests/test_layers.py); the study hands over its job functions.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import submitit

from medsynapse.config import ConfigError


class ClusterJob(submitit.helpers.Checkpointable):
    """One study job as submitit runs it (pickled with its function and argument). On preemption or time-out submitit
    calls `checkpoint` (inherited: the same call again) and requeues it."""

    def __init__(self, fn: Callable[[Any], Any], job: Any, threads: int | None = None) -> None:
        self.fn, self.job, self.threads = fn, job, threads

    def __call__(self) -> Any:
        import torch

        os.environ["TQDM_DISABLE"] = "1"
        if self.threads:
            torch.set_num_threads(self.threads)
        if submitit.JobEnvironment().num_tasks > 1:  # one process per task: torchrun's variables for accelerate
            submitit.helpers.TorchDistributedEnvironment().export()
        return self.fn(self.job)


def make_executor(launcher: str, folder: Path, parameters: dict) -> Any:
    """submitit's executor for `launcher` with the study file's `cluster:` parameters (checked by check_cluster)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if launcher == "submitit-local" else "slurm")
    executor.update_parameters(**parameters)
    return executor


def check_cluster(parameters: dict, where: str) -> None:
    """submitit's own check of the `cluster:` parameters, on any machine (an executor for SLURM can only be built
    where `srun` exists; the local one checks the generic and the `slurm_` names alike): an unknown name or a value
    of the wrong type is one line naming the study file."""
    with tempfile.TemporaryDirectory() as folder:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        try:
            executor.update_parameters(**parameters)
        except (NameError, AssertionError, ValueError, TypeError) as error:  # submitit's ways of refusing
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{where}.cluster: {first}") from None


class SubmititPool:
    """The study's pool (`submit(fn, job)` -> Future, `cancel_all`, `shutdown`) over a submitit executor: each job is
    submitted at once and a thread waits for its result (submitit polls the scheduler), completing the Future with the
    job's return value or its error."""

    def __init__(self, executor: Any, threads: int | None = None) -> None:
        self.executor, self.threads = executor, threads
        self.jobs: list[Any] = []  # submitit's Job objects

    def submit(self, fn: Callable[[Any], Any], job: Any) -> Future:
        submitted = self.executor.submit(ClusterJob(fn, job, self.threads))
        self.jobs.append(submitted)
        future: Future = Future()

        def wait() -> None:
            try:
                future.set_result(submitted.result())
            except BaseException as error:  # the job's own error (submitit re-raises it), or a failed job
                future.set_exception(error)

        threading.Thread(target=wait, daemon=True, name=f"submitit-{submitted.job_id}").start()
        return future

    def cancel_all(self) -> None:
        """Cancel every job still running (a failed job or Ctrl-C stops the study and its jobs)."""
        for submitted in self.jobs:
            if not submitted.done():
                submitted.cancel(check=False)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self.cancel_all()
