"""FSDP2 (`distributed: fsdp`) under `torchrun --nproc_per_node 2` with gloo on CPU: each rank holds half of the
frozen VLM, and training gives the trainable weights of the one-process run (the DDP tests' tolerances: the sharded
VLM is gathered exactly, only the summation order of the trainable gradients differs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import run_file
from safetensors.torch import load_file
from test_distributed import (
    FLOAT64,
    PROBE,
    TORCHRUN,
    _check_learning_rates,
    _check_weights,
    _config,
    _probe,
    _stage2_and_stage3_files,
    needs_torchrun,
)

pytestmark = pytest.mark.distributed


def _held(folder) -> list[dict]:
    return [json.loads((folder / f"sharding.rank{rank}.json").read_text()) for rank in range(2)]


@needs_torchrun
def test_stage1_under_fsdp2_matches_one_process_and_holds_half_the_vlm(tiny_env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    configs = {}
    for name, out in (("one", one), ("two", two)):
        configs[name] = _config(tiny_env, out, "distributed: fsdp\n")
    a = _probe(["train", "stage1", "--config", str(configs["one"])], tmp_path / "probe1")
    b = _probe(["train", "stage1", "--config", str(configs["two"])], tmp_path / "probe2", processes=2, port=29581)
    _check_learning_rates(a, b, 1e-2, 8, 0.25)
    _check_weights(a, b, "stage1")
    held = _held(two)
    assert not (one / "sharding.rank0.json").exists()  # one process: nothing sharded
    assert [h["rank"] for h in held] == [0, 1] and held[0]["vlm_parameters"] == held[1]["vlm_parameters"]
    for h in held:  # each rank's local shards: half of every tensor (rounded up per tensor)
        assert h["vlm_local_fraction"] == pytest.approx(0.5, abs=0.01)
    assert load_file(str(two / "sampler.safetensors")).keys() == b.after.keys()


@needs_torchrun
def test_stage2_and_stage3_under_fsdp2_match_one_process(tiny_env, tmp_path, distributed_stage1):
    """Stage II trains the LoRA inside the sharded units (reduce-scattered gradients, sharded optimizer state and
    checkpoints); Stage III trains A_psi beside the sharded VLM + LoRA, with generation kept in step across ranks.
    Both against the one-process run of the same settings, the saved folders are the single-folder format."""
    from medsynapse.model.medsynapse import MedSynapseV

    stage1 = distributed_stage1
    probes = {}
    for world in (1, 2):
        _stage2_and_stage3_files(tiny_env, tmp_path, world, stage1, "save_every: 2\ndistributed: fsdp\n",
                                 "fused_jsd: true\ndistributed: fsdp\n")
        for stage, port in (("stage2", 29583), ("stage3", 29585)):
            probes[stage, world] = _probe(["train", stage, "--config", str(tmp_path / f"{stage}-{world}.yaml")],
                                          tmp_path / f"probe-{stage}-{world}", processes=world, port=port)
    for stage in ("stage2", "stage3"):
        _check_learning_rates(probes[stage, 1], probes[stage, 2], 1e-2, 6, 0.25)
        _check_weights(probes[stage, 1], probes[stage, 2], stage)
    assert all(h["vlm_local_fraction"] == pytest.approx(0.5, abs=0.01) for h in _held(tmp_path / "w2" / "s2"))
    assert (tmp_path / "w2" / "s2" / "checkpoints" / "step_0000002" / "sharded" / ".metadata").is_file()
    for stage, folder in (("stage2", "s2"), ("stage3", "s3")):  # gathered on rank 0 into the usual folder
        loaded = MedSynapseV.from_pretrained(tmp_path / "w2" / folder, dtype="float64")
        lora = {k: v for k, v in loaded.vlm.named_parameters() if "lora_" in k}
        assert lora and not any(hasattr(v, "full_tensor") for v in lora.values())
        if stage == "stage2":
            after = probes["stage2", 2].after
            assert sorted(after) == sorted(lora) and all(torch.equal(after[k], lora[k]) for k in after)


@needs_torchrun
def test_fsdp2_stage2_killed_and_resumed_from_its_sharded_checkpoint_equals_an_uninterrupted_run(
        tiny_env, tmp_path, distributed_stage1):
    """SIGKILL to every process of a 2-rank FSDP2 Stage II once a sharded checkpoint exists, then `--resume` (the
    LoRA shards and the sharded optimizer state come back through torch.distributed.checkpoint): the same adapter as
    a run that was never stopped."""
    stage1 = distributed_stage1

    def config(name: str) -> str:
        path = run_file(tmp_path / f"{name}.yaml", "stage2",
                        f"model: {stage1}\ntrain_file: {tiny_env.train_file}\noutput_dir: {tmp_path / name}\n"
                        "lora_r: 4\nlora_alpha: 8\nbatch_size: 4\ngroup_size: 2\nmax_steps: 10\nmax_new_tokens: 3\n"
                        "lr: 1.0e-2\nwarmup_ratio: 0.25\ntemperature: 1.0\ndtype: float64\nsave_every: 2\n"
                        "distributed: fsdp\n")
        return str(path)

    straight = _probe(["train", "stage2", "--config", config("straight")], tmp_path / "probe-straight",
                      processes=2, port=29587)
    killed = tmp_path / "killed"
    launch = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29589", PROBE, "recipe",
              str(tmp_path / "probe-killed"), "train", "stage2", "--config", config("killed")]
    process = subprocess.Popen(launch, env=FLOAT64, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step_0000002").is_dir():
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoints" / "step_0000002" / "sharded" / ".metadata").is_file()
    assert not (killed / "medsynapse.json").exists()  # stopped before the end
    import shutil

    shutil.copytree(killed, tmp_path / "killed_one")  # the same sharded checkpoints, resumed by one process
    resumed = _probe(["train", "stage2", "--config", config("killed"), "--resume"], tmp_path / "probe-resumed",
                     processes=2, port=29591)
    assert resumed.after.keys() == straight.after.keys()
    for name, value in straight.after.items():
        assert torch.equal(resumed.after[name], value), name
    one = _probe(["train", "stage2", "--config", config("killed_one"), "--resume"], tmp_path / "probe-one")
    for name, value in straight.after.items():  # DCP reads the shards back whole; one process vs two: 1e-12
        torch.testing.assert_close(one.after[name], value, atol=1e-12, rtol=0)


@needs_torchrun
def test_sharded_generation_calls_units_directly_and_ranks_stop_at_their_own_length(tiny_env, tmp_path):
    """The vision tower and the input embeddings run before any forward of the root (the root was set up when the
    VLM was sharded), and a rank whose answers end first keeps stepping until the other is done (`synced_gpus` for a
    sharded VLM; without it the longer rank waits for a gather the other never joins and the launch times out).
    The answers equal one unsharded process's."""
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.vlm import is_sharded

    out = tmp_path / "generate"
    run = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29599", PROBE, "generate", str(out),
                          str(tiny_env.vlm), str(tiny_env.test_file)], env={**os.environ, "TQDM_DISABLE": "1"},
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    model = MedSynapseV.from_pretrained(tiny_env.vlm)
    assert not is_sharded(model.vlm)
    samples = read_samples(tiny_env.test_file)[:3]
    images, questions = [load_image(s.images[0]) for s in samples], [s.question for s in samples]
    for rank in (0, 1):
        found = json.loads((out / f"answers.rank{rank}.json").read_text())
        assert found["sharded"] and found["local_fraction"] < 0.6
        assert found["answers"] == model.answer(images, questions, max_new_tokens=2 + 4 * rank)


def test_the_units_cover_every_vlm_parameter_once(tiny_env):
    """What shard_vlm shards (and benchmarks/fsdp_memory.py counts): every parameter of the VLM in exactly one
    unit, so none is left replicated and unsynchronised."""
    from medsynapse.model.vlm import load_vlm
    from medsynapse.recipes.sharding import units

    vlm, _ = load_vlm(tiny_env.vlm, dtype="float32")
    owned = [id(p) for unit in units(vlm) for p in unit.parameters()]
    assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in vlm.parameters()}


@needs_torchrun
def test_sft_under_fsdp2_matches_one_process(tiny_env, tmp_path):
    """The SFT baseline (LoRA trained in the sharded units, as Stage II) against one process."""
    probes = {}
    for world in (1, 2):
        path = run_file(tmp_path / f"sft-{world}.yaml", "sft",
                        f"model: {tiny_env.vlm}\ntrain_file: {tiny_env.train_file}\n"
                        f"output_dir: {tmp_path / str(world)}\nlora_r: 4\nlora_alpha: 8\nbatch_size: 4\n"
                        "max_steps: 6\nlr: 1.0e-2\nwarmup_ratio: 0.25\n"
                        "loss_reduction: sample\nanswer_types: [yes_no, multiple_choice]\ndtype: float64\n"
                        "distributed: fsdp\n")
        probes[world] = _probe(["train", "sft", "--config", str(path)], tmp_path / f"probe-{world}",
                               processes=world, port=29593)
    _check_learning_rates(probes[1], probes[2], 1e-2, 6, 0.25)
    _check_weights(probes[1], probes[2], "sft")
    assert all(h["vlm_local_fraction"] == pytest.approx(0.5, abs=0.01) for h in _held(tmp_path / "2"))


@needs_torchrun
@pytest.mark.parametrize("method,patches", [("coconut", 0)])
def test_latent_baselines_train_on_two_processes_under_fsdp2(tiny_env, tmp_path, method, patches):
    """Coconut† runs several forwards of the model before one backward: DDP refuses that, FSDP2 does not. Two ranks
    give the one-process LoRA (optimizer reset per curriculum stage, continuous thoughts backpropagated through the
    sharded units). IVT-LR† is refused under FSDP2 (its KV-cache gradient path; the recipe says so)."""
    import yaml

    probes = {}
    for world in (1, 2):
        run = {"output": str(tmp_path / f"run{world}"),
               "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "lora_r": 4, "lora_alpha": 8},
               "data": {"stage1_file": str(tiny_env.train_file)},
               "stage1": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "answer_types": ["yes_no"],
                          "loss_reduction": "sample", "dtype": "float64", "save_every": 100},
               "baselines": {method: {"max_latent_stage": 2, "thoughts_per_step": 1, "patches_per_step": patches,
                                      "distributed": "fsdp", "weight_decay": 0.0}}}
        path = tmp_path / f"run{world}.yaml"
        path.write_text(yaml.safe_dump(run))
        probes[world] = _probe(["train", "baseline", "--method", method, "--config", str(path)],
                               tmp_path / f"probe-{world}", processes=world, port=29595)
    _check_weights(probes[1], probes[2], "sft")  # LoRA trained from sample-mean losses: SFT's tolerance
    assert all(h["vlm_local_fraction"] == pytest.approx(0.5, abs=0.01)
               for h in _held(tmp_path / "run2" / method.replace("-", "_")))


@needs_torchrun
def test_ivt_lr_is_refused_under_fsdp2_with_its_reason(tiny_env, tmp_path):
    import yaml

    run = {"output": str(tmp_path / "run"),
           "model": {"vlm": str(tiny_env.vlm), "encoder": str(tiny_env.encoder), "lora_r": 4, "lora_alpha": 8},
           "data": {"stage1_file": str(tiny_env.train_file)},
           "stage1": {"max_steps": 2, "batch_size": 4, "answer_types": ["yes_no"]},
           "baselines": {"ivt-lr": {"max_latent_stage": 1, "patches_per_step": 1, "distributed": "fsdp"}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    launch = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29597", "-m", "medsynapse.cli", "train",
              "baseline", "--method", "ivt-lr", "--config", str(tmp_path / "run.yaml")]
    done = subprocess.run(launch, env=FLOAT64, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "IVT-LR with distributed: fsdp" in done.stderr and "KV cache" in done.stderr
    assert "Traceback" not in done.stderr.split("IVT-LR with distributed")[0][-500:]  # one line, no traceback
