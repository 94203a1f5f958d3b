"""Stages I-III and SFT under `torchrun --nproc_per_node 2` (gloo, CPU) against one process with the same global batch:
the learning rate of every optimizer step (exactly) and the trained weights (to float64 summation noise).

The recipes run inside tests/distributed_probe.py, which records what each optimizer step used.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_file
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
ENV = {**os.environ, "TQDM_DISABLE": "1"}
FLOAT64 = {**ENV, "PROBE_FLOAT64": "1"}
PROBE = str(Path(__file__).with_name("distributed_probe.py"))
# Weights trained on 1 and on 2 processes from the same global batches agree up to float summation order (DDP's gloo
# all-reduce of the two halves' gradients, each rank padding its half to its own length). In float32 that noise is not
# small here: r_causal is a difference of two log-probabilities of ~1e-4 nats (noise ~1e-6), the group normalisation
# makes that 1 % of the advantages, and Adam turns near-zero gradient entries into ±lr steps; measured gaps were as
# large as the weights' whole movement. So the runs are in float64 (the probe builds the recipes' modules in float64),
# where the gaps measured over these runs were ≤ 3e-15 (the answer loss keeps float64 logits in float64; its former
# float32 cast left 1.0e-8 in Stage I). The tolerances below are ~100x those.
TOLERANCE = {"stage1": 1e-12, "stage2": 1e-12, "stage3": 1e-12, "sft": 1e-12}
MOVE = 100 * max(TOLERANCE.values())  # every trained tensor must move this far, or the comparison proves nothing
# A_psi's attention pooling adds key_proj(β) + b to every key alike: a constant shift of each query's logits, which
# softmax ignores; these tensors get no gradient and cannot move (checked: they stay within 1e-12 of their start).
INERT = {"stage3": {"key_norm.bias", "key_proj.bias"}}


@dataclass
class Probe:
    lrs: list[list[list[float]]]  # per rank, per optimizer step, per parameter group: the learning rate used
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


def _probe(args: list[str], out: Path, processes: int = 1, port: int = 29531, mode: str = "recipe",
           env: dict = FLOAT64) -> Probe:
    launcher = [TORCHRUN, "--nproc_per_node", str(processes), "--master_port", str(port)] if processes > 1 \
        else [sys.executable]
    run = subprocess.run([*launcher, PROBE, mode, str(out), *args], env=env, capture_output=True, text=True,
                         timeout=900)  # a hung rank fails the test instead of stalling the suite
    assert run.returncode == 0, run.stderr[-3000:]
    lrs = [json.loads((out / f"lrs.rank{rank}.json").read_text()) for rank in range(processes)]
    weights = [load_file(str(out / f"{name}.safetensors")) if mode == "recipe" else {} for name in ("before", "after")]
    return Probe(lrs, *weights)


def cosine_with_warmup(lr: float, total: int, warmup_ratio: float) -> list[float]:
    """The schedule written out (transformers' cosine with linear warm-up), one value per optimizer step."""
    warmup = math.ceil(warmup_ratio * total)
    return [lr * (k / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
            for k in range(total)]


def _check_learning_rates(one: Probe, two: Probe, lr: float, total: int, warmup_ratio: float) -> None:
    used = [groups[0] for groups in one.lrs[0]]
    assert all(len(set(groups)) == 1 for groups in one.lrs[0])  # decay and no-decay groups share the schedule
    assert used == pytest.approx(cosine_with_warmup(lr, total, warmup_ratio), rel=1e-12, abs=0)
    assert two.lrs[0] == one.lrs[0] and two.lrs[1] == one.lrs[0]  # exactly, at every step, on both ranks


def _check_weights(one: Probe, two: Probe, what: str) -> None:
    assert one.before.keys() == two.before.keys() == one.after.keys() == two.after.keys() and one.after
    inert = INERT.get(what, set())
    assert inert <= one.after.keys()
    for name in one.after:
        assert torch.equal(one.before[name], two.before[name]), f"{what}: {name} starts differently"
        moved = float((one.after[name] - one.before[name]).abs().max())
        if name in inert:
            assert moved < 1e-12, f"{what}: {name} has no gradient but moved {moved:.2e}"
        else:
            assert moved >= MOVE, f"{what}: {name} moved only {moved:.2e}"
        torch.testing.assert_close(two.after[name], one.after[name], atol=TOLERANCE[what], rtol=0,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


def _config(tiny_env, out, extra: str = ""):
    """OUT.yaml: a run file whose stage1 section trains into OUT (plus `extra` YAML lines in that section)."""
    return run_file(out.with_suffix(".yaml"), "stage1",
                    f"vlm: {tiny_env.vlm}\nencoder: {tiny_env.encoder}\ntrain_file: {tiny_env.train_file}\n"
                    f"output_dir: {out}\nn_memory: 4\nsampler_width: 32\nbatch_size: 8\nmax_steps: 8\nlr: 1.0e-2\n"
                    "warmup_ratio: 0.25\nloss_reduction: sample\nanswer_types: [yes_no, multiple_choice]\n"
                    "save_every: 4\ndtype: float64\n" + extra)


def _stage2_and_stage3_files(tiny_env, tmp_path, world: int, stage1, stage2_extra: str = "",
                             stage3_extra: str = "") -> None:
    """TMP/stage2-WORLD.yaml (from `stage1`, into TMP/wWORLD/s2) and TMP/stage3-WORLD.yaml (from that, into .../s3),
    run files: the settings every 1-vs-2-process comparison of Stages II-III uses, plus `*_extra` YAML lines."""
    out = tmp_path / f"w{world}"
    run_file(tmp_path / f"stage2-{world}.yaml", "stage2",
        f"model: {stage1}\ntrain_file: {tiny_env.train_file}\noutput_dir: {out / 's2'}\nlora_r: 4\n"
        "lora_alpha: 8\nbatch_size: 4\ngroup_size: 2\nmax_steps: 3\nnum_iterations: 2\nmax_new_tokens: 3\n"
        "lr: 1.0e-2\nwarmup_ratio: 0.25\ntemperature: 1.0\ndtype: float64\n" + stage2_extra)
    run_file(tmp_path / f"stage3-{world}.yaml", "stage3",
        f"model: {out / 's2'}\ntrain_file: {tiny_env.train_file}\noutput_dir: {out / 's3'}\nbatch_size: 4\n"
        "max_steps: 6\nmax_new_tokens: 3\nlr: 1.0e-2\nwarmup_ratio: 0.25\ndtype: float64\n" + stage3_extra)


@needs_torchrun
def test_trainer_plumbing_steps_the_schedule_once_per_optimizer_step(tmp_path):
    """What every recipe uses (make_accelerator, adamw, cosine_schedule, prepare, save/load_checkpoint) on a toy
    module: under 2 processes, including a resume from a checkpoint, the learning rate at every step is the one of
    the schedule, as on 1 process."""
    args = ["7", "0.3", "3"]  # 7 steps, 3 of warm-up, checkpoint after 3 then resume into fresh objects
    one = _probe(args, tmp_path / "one", mode="plumbing")
    two = _probe(args, tmp_path / "two", processes=2, port=29571, mode="plumbing")
    _check_learning_rates(one, two, 1e-3, 7, 0.3)


@needs_torchrun
def test_stage1_two_processes_match_one(tiny_env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = _probe(["train", "stage1", "--config", str(_config(tiny_env, one))], tmp_path / "probe1")
    b = _probe(["train", "stage1", "--config", str(_config(tiny_env, two))], tmp_path / "probe2", processes=2)
    _check_learning_rates(a, b, 1e-2, 8, 0.25)
    _check_weights(a, b, "stage1")
    saved = load_file(str(one / "sampler.safetensors"))  # what the recipe saved is what the probe saw
    for name, value in a.after.items():
        assert torch.equal(saved[name], value)


@needs_torchrun
def test_stage2_stage3_and_sft_two_processes_match_one(tiny_env, tmp_path, distributed_stage1):
    """Keyed rollout sampling makes the B·G rollouts of a global batch the same on 1 or 2 processes, Stage III divides
    by the global token count, and SFT (like Stage I) averages per-sample losses, so the trained weights must agree
    as in Stage I. Stage II takes two optimizer steps per step (num_iterations: 2), each a step of the schedule."""
    stage1 = distributed_stage1
    probes = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        _stage2_and_stage3_files(tiny_env, tmp_path, world, stage1)
        run_file(tmp_path / f"sft-{world}.yaml", "sft",
            f"model: {tiny_env.vlm}\ntrain_file: {tiny_env.train_file}\noutput_dir: {out / 'sft'}\nlora_r: 4\n"
            "lora_alpha: 8\nbatch_size: 4\nmax_steps: 6\nlr: 1.0e-2\nwarmup_ratio: 0.25\nloss_reduction: sample\n"
            "answer_types: [yes_no, multiple_choice]\ndtype: float64\n")
        for stage, port in (("stage2", 29533), ("stage3", 29535), ("sft", 29541)):
            probes[stage, world] = _probe(["train", stage, "--config", str(tmp_path / f"{stage}-{world}.yaml")],
                                          tmp_path / f"probe-{stage}-{world}", processes=world, port=port)
    for stage, total in (("stage2", 6), ("stage3", 6), ("sft", 6)):
        one, two = probes[stage, 1], probes[stage, 2]
        _check_learning_rates(one, two, 1e-2, total, 0.25)
        _check_weights(one, two, stage)
    for world in (1, 2):  # the saved adapters / A_psi are what the probes saw
        saved = load_file(str(tmp_path / f"w{world}" / "s3" / "autonomous.safetensors"))
        after = probes["stage3", world].after
        assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)


@needs_torchrun
def test_eval_under_two_processes_equals_one(tiny_env, tmp_path):
    """Batches are dealt to ranks round-robin and merged in data order: the same predictions and metrics."""
    from medsynapse.data.sources.fixtures import write_fixtures
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32,
                      dtype="float32").save_pretrained(model_dir)
    root = write_fixtures(tmp_path / "data")
    names = "mmmu-med,medxpertqa-mm,pmc-vqa"
    args = ["-m", "medsynapse.cli", "eval", "--model", str(model_dir), "--benchmarks", names, "--data-root", str(root),
            "--batch-size", "1", "--max-new-tokens", "4"]
    for world, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        launcher = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29537"] if world == 2 else [sys.executable]
        run = subprocess.run([*launcher, *args, "--output", str(out)], env=ENV, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    for name in names.split(","):
        one = json.loads((tmp_path / "one" / name / "metrics.json").read_text())
        two = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert two["efficiency"]["processes"] == 2 and one["efficiency"]["processes"] == 1
        one.pop("efficiency")
        two.pop("efficiency")
        assert one == two
        lines = [(tmp_path / d / name / "predictions.jsonl").read_text().splitlines() for d in ("one", "two")]
        assert [json.loads(x)["raw"] for x in lines[0]] == [json.loads(x)["raw"] for x in lines[1]]
        assert not list((tmp_path / "two" / name).glob("predictions.part*"))


def test_sharded_launch_types_are_refused_up_front():
    from accelerate.utils import DistributedType

    from medsynapse.recipes.trainer import check_supported

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(NotImplementedError, match="ddp.yaml"):
            check_supported(kind)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_supported(kind)


@needs_torchrun
def test_the_pipeline_runs_under_two_processes_and_a_rerun_redoes_nothing(tiny_env, tmp_path):
    """The pipeline is a one-seed study: every rank runs each job together; convert/cache and every record are the
    main process's; a finished run is kept whole."""
    import yaml

    from medsynapse.data.sources.fixtures import write_fixtures

    out = tmp_path / "run"
    run = {"output": str(out),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "n_memory": 4, "sampler_width": 32,
                     "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file), "prior_cache": str(tmp_path / "cache")},
           "stage1": {"max_steps": 2, "batch_size": 4, "answer_types": ["yes_no"]},
           "stage2": {"max_steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 3,
                      "answer_types": ["yes_no"]},
           "stage3": {"max_steps": 2, "batch_size": 2, "max_new_tokens": 3, "answer_types": ["yes_no"]},
           "eval": {"benchmarks": ["vqa-rad"], "data_root": str(write_fixtures(tmp_path / "data")), "batch_size": 1,
                    "max_new_tokens": 2, "limit": 2}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29543", "-m", "medsynapse.cli", "pipeline",
               "--config", str(config)]
    first = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "study.json").read_text())
    assert list(result["rows"]) == ["base", "stage2", "student"] and (out / "table.md").is_file()
    assert {row: r["cells"]["0"]["benchmarks"]["vqa-rad"]["n"] for row, r in result["rows"].items()} == {
        "base": 2, "stage2": 2, "student": 2}  # every question scored once over the two ranks (eval.limit 2)
    assert list(json.loads((out / "prepare.json").read_text())["steps"]) == ["convert", "cache"]
    assert (out / "stage3_student" / "autonomous.safetensors").is_file()
    weights = out / "stage2" / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("6 jobs (3 trainings, 3 evaluations, 3 cells); 6 already finished") == 2  # both ranks
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((out / "study.json").read_text())["rows"] == result["rows"]
