"""Stage II's rollouts from vLLM (`engine: vllm`): the engine samples the policy being trained.

Runs under `.venv-vllm` only (`make test-vllm`). The weight sync is checked by behaviour: vLLM's own weights are
packed for its CPU kernels and cannot be read back, so a synced engine must generate what the trainer's LoRA model
generates (greedy tokens equal, per-token log-probabilities within float32 rounding), where a stale one does not.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stage1_config

pytest.importorskip("vllm", reason="vllm is not importable in this environment: the vLLM tests run under .venv-vllm "
                    "(make vllm-env && make test-vllm)")

from medsynapse.data.images import load_image  # noqa: E402
from medsynapse.data.schema import read_samples  # noqa: E402
from medsynapse.engines.vllm_engine import VLLMEngine  # noqa: E402
from medsynapse.model.medsynapse import MedSynapseV  # noqa: E402
from medsynapse.model.vlm import completion_logprobs, completion_mask, vision_features  # noqa: E402
from medsynapse.recipes.stage1_warmup import train_stage1  # noqa: E402
from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2  # noqa: E402

MAX_NEW = 8
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOGPROB_ATOL = 1e-4  # float32 both sides: measured gaps ≤ 4.8e-7


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # quick to start; the same engine code


def _greedy_gap(model: MedSynapseV, engine: VLLMEngine, images, questions) -> list[float | None]:
    """Per question: the largest log-prob gap when vLLM's greedy tokens equal transformers', else None."""
    items = [model.prompts.encode(imgs, q) for imgs, q in zip(images, questions)]
    flat = [img for imgs in images for img in imgs]
    tokens = model.generate_encoded(items, flat, MAX_NEW)
    mask = completion_mask(tokens, model.prompts.eos_id)
    batch = model.prompts.collate(items, with_answers=False)
    features = vision_features(model.vlm, batch)
    with torch.no_grad():
        logp = completion_logprobs(model.vlm, batch, model.memory_for(batch, flat, features), tokens, mask,
                                   model.latent_id, features)
    gaps: list[float | None] = []
    for row, out in enumerate(engine.generate(images, questions, MAX_NEW, logprobs=True)):
        length = int(mask[row].sum())
        same = out[0].token_ids == tokens[row, :length].tolist()
        gaps.append(float((torch.tensor(out[0].logprobs) - logp[row, :length]).abs().max()) if same else None)
    return gaps


def test_after_a_sync_the_engine_generates_what_the_trainers_lora_model_generates(tiny_env, tmp_path):
    torch.manual_seed(0)
    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
    model.add_lora(4, 8, 0.0, ALL_PROJECTIONS)  # unmerged, as Stage II trains it (the demo's targets)
    samples = read_samples(tiny_env.test_file)[:4]
    images, questions = [[load_image(s.images[0], s)] for s in samples], [s.question for s in samples]
    engine = VLLMEngine(model, tmp_path / "export", max_model_len=1024)
    assert all(g is not None and g <= LOGPROB_ATOL for g in _greedy_gap(model, engine, images, questions))
    with torch.no_grad():  # an optimiser step's worth of change, and more
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    assert all(g is None or g > 100 * LOGPROB_ATOL for g in _greedy_gap(model, engine, images, questions))  # stale
    assert engine.sync_weights(model.vlm) == 2 * len(ALL_PROJECTIONS)  # every projection of both layers
    assert all(g is not None and g <= LOGPROB_ATOL for g in _greedy_gap(model, engine, images, questions))
    engine.close()


@pytest.fixture(scope="module")
def stage1_dir(tiny_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    train_stage1(stage1_config(tiny_env, out, max_steps=2))
    return out


@pytest.mark.parametrize(("lambda_causal", "own_process"), [(0.5, False), (0.0, True)])
def test_stage2_on_vllm_rollouts_samples_the_policy_at_every_step(tiny_env, stage1_dir, tmp_path, lambda_causal,
                                                                   own_process, monkeypatch):
    """Every step's rollouts come from the policy as the last optimiser step left it: vLLM's per-token log-probs
    of its own samples equal the training model's (T = 1), step after step, while the LoRA moves (lr 3e-2). Once
    with the engine in its own process (vLLM's default: the weights cross a process boundary)."""
    prompts = 2
    if own_process:  # and 64 prompts x G 2: more prefill than vLLM's CPU default step of 4,096 tokens
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        prompts = 64
    config = Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file), output_dir=str(tmp_path / "s2"),
                          lora_r=4, lora_alpha=8, group_size=2, batch_size=prompts, max_steps=4, save_every=4, lr=3e-2,
                          max_new_tokens=6, temperature=1.0, top_p=1.0, lambda_causal=lambda_causal, log_every=1,
                          engine="vllm")
    out = train_stage2(config)
    summary = json.loads((out / "causal_reward_summary.json").read_text())
    gaps = summary["engine_logprob_gap_per_step"]
    assert summary["engine"] == "vllm" and len(gaps) == 4
    assert max(gaps) <= LOGPROB_ATOL, gaps
    assert not (out / ".vllm").exists()  # the exported copy is removed at the end
    trained = MedSynapseV.from_pretrained(out)
    lora = {k: v for k, v in trained.vlm.state_dict().items() if "lora_B" in k}
    assert lora and all(v.abs().max() > 1e-3 for v in lora.values())  # the policy moved: a stale engine would show


def test_stage3_on_vllm_trajectories_are_the_students_with_each_steps_memory(tiny_env, stage1_dir, tmp_path):
    """The student's memory changes every step (A_psi trains, lr 3e-2) while the VLM is frozen: each step's vLLM
    trajectories carry that step's memory (engine log-probs equal the training model's under it)."""
    from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3

    stage2 = train_stage2(Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file),
                                       output_dir=str(tmp_path / "s2"), lora_r=4, lora_alpha=8, group_size=2,
                                       batch_size=2, max_steps=1, lr=1e-2, max_new_tokens=4, temperature=1.0))
    config = Stage3Config(model=str(stage2), train_file=str(tiny_env.train_file), output_dir=str(tmp_path / "s3"),
                          batch_size=2, max_steps=3, save_every=3, lr=3e-2, max_new_tokens=6, attention_dim=32,
                          top_p=1.0, engine="vllm")
    out = train_stage3(config)
    gaps = json.loads((out / "engine_rollouts.json").read_text())["engine_logprob_gap_per_step"]
    assert len(gaps) == 3 and max(gaps) <= LOGPROB_ATOL, gaps
    assert not (out / ".vllm").exists()
    assert MedSynapseV.from_pretrained(out).autonomous is not None


def test_stage2_on_vllm_killed_and_resumed_equals_an_uninterrupted_run(tiny_env, stage1_dir, tmp_path):
    """Every request is seeded from its prompt's row key and the engine is reloaded with the checkpoint's weights,
    so a resumed run draws what the uninterrupted one drew: the final adapters are equal bit for bit."""
    from conftest import Interrupted, crash_at
    from safetensors.torch import load_file

    def config(name: str, **extra) -> Stage2Config:
        return Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file),
                            output_dir=str(tmp_path / name), lora_r=4, lora_alpha=8, group_size=2, batch_size=2,
                            max_steps=4, save_every=2, lr=3e-2, max_new_tokens=6, temperature=1.0, top_p=1.0,
                            engine="vllm", **extra)

    straight = load_file(str(train_stage2(config("a")) / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(Interrupted):
        train_stage2(config("b"), on_step=crash_at(3))
    resumed = load_file(str(train_stage2(config("b", resume=True)) / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and len(straight) > 0
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert any(straight[name].abs().max() > 1e-3 for name in straight if "lora_B" in name)  # it trained


def test_given_the_same_rollouts_a_stage2_run_on_vllm_trains_as_the_transformers_path(tiny_env, stage1_dir, tmp_path,
                                                                                       monkeypatch):
    """Everything after the rollouts is the transformers path's: a run with `engine: hf` handed the vLLM run's
    rollouts (tokens, masks, texts) step by step ends with the same adapter and causal-reward record, bit for bit."""
    import dataclasses

    from safetensors.torch import load_file

    from medsynapse.recipes import stage2_ccr

    def config(name: str, engine: str) -> Stage2Config:
        return Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file),
                            output_dir=str(tmp_path / name), lora_r=4, lora_alpha=8, group_size=2, batch_size=2,
                            max_steps=3, lr=3e-2, max_new_tokens=6, temperature=1.0, top_p=1.0,
                            record_last_fraction=1.0, engine=engine)

    drawn = []
    from_engine = stage2_ccr.engine_rollouts
    monkeypatch.setattr(stage2_ccr, "engine_rollouts", lambda *a: drawn.append(from_engine(*a)) or drawn[-1])
    on_vllm = train_stage2(config("vllm", "vllm"))
    handed = iter([dataclasses.replace(r, engine_logprobs=None) for r in drawn])
    monkeypatch.setattr(stage2_ccr, "generate_rollouts", lambda *a: next(handed))
    on_hf = train_stage2(config("hf", "hf"))
    a = load_file(str(on_vllm / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(on_hf / "adapter" / "adapter_model.safetensors"))
    assert len(drawn) == 3 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = [json.loads((out / "causal_reward_summary.json").read_text()) for out in (on_vllm, on_hf)]
    assert [{k: r[k] for k in ("mean_causal_reward_correct", "mean_causal_reward_wrong", "n_correct", "n_wrong")}
            for r in record][0] == {k: record[1][k] for k in ("mean_causal_reward_correct", "mean_causal_reward_wrong",
                                                                "n_correct", "n_wrong")}


def test_stage2_on_vllm_sends_each_records_system_message(tiny_env, stage1_dir, tmp_path):
    """Records with a system message: the engine renders the same chat as the training model encodes (the gap
    stays within float rounding only if vLLM sampled with the system message too)."""
    records = [json.loads(line) for line in tiny_env.train_file.read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(tiny_env.train_file.parent / "images")
    if (tiny_env.train_file.parent / "masks").exists():
        (data / "masks").symlink_to(tiny_env.train_file.parent / "masks")
    (data / "train.jsonl").write_text("".join(
        json.dumps({**r, "system": "You are a radiologist. Answer briefly."}) + "\n" for r in records))
    out = train_stage2(Stage2Config(model=str(stage1_dir), train_file=str(data / "train.jsonl"),
                                    output_dir=str(tmp_path / "s2"), lora_r=4, lora_alpha=8, group_size=2,
                                    batch_size=2, max_steps=1, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                    engine="vllm"))
    gaps = json.loads((out / "causal_reward_summary.json").read_text())["engine_logprob_gap_per_step"]
    assert len(gaps) == 1 and gaps[0] <= LOGPROB_ATOL, gaps
