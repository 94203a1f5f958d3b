"""SFT control: LoRA-only training without memory, the answer-window loss, exact resume, a memory-free folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Interrupted, crash_at
from safetensors.torch import load_file

from medsynapse.data.dataset import training_dataset
from medsynapse.data.images import load_image
from medsynapse.data.schema import read_samples
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import forward_with_memory, load_vlm
from medsynapse.objectives.ntp import answer_nll
from medsynapse.recipes.sft import SFTConfig, base_vlm_path, sft_loss, train_sft

ADAPTER = Path("adapter") / "adapter_model.safetensors"
FIXED = dict(families=["general"], answer_types=["yes_no"])  # 12 questions: batch_size 12 is one fixed batch


def _config(tiny_env, out, **kw) -> SFTConfig:
    base = dict(model=str(tiny_env.vlm), train_file=str(tiny_env.train_file), output_dir=str(out), lora_r=4,
                lora_alpha=8, lora_targets=["q_proj", "v_proj", "gate_proj"], batch_size=4, max_steps=4,
                save_every=2, lr=1e-3, warmup_ratio=0.0, log_every=1, answer_types=["yes_no", "multiple_choice"])
    base.update(kw)
    return SFTConfig(**base)


def _fresh_lora_model(tiny_env, config: SFTConfig) -> MedSynapseV:
    """The model train_sft starts from (same seed, same LoRA init), before any step."""
    torch.manual_seed(config.seed)
    vlm, processor = load_vlm(tiny_env.vlm, dtype=config.dtype)
    model = MedSynapseV(vlm, processor, vlm_path=str(tiny_env.vlm))
    model.vlm.requires_grad_(False)
    model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    return model


def test_sft_trains_only_the_lora_and_every_other_weight_is_bit_identical(tiny_env, tmp_path, monkeypatch):
    loaded = []

    def recording_load_vlm(*args, **kwargs):
        loaded.append(sft_load(*args, **kwargs))
        return loaded[-1]

    import medsynapse.model.medsynapse as medsynapse_model  # MedSynapseV.plain_with_lora loads through it

    sft_load = medsynapse_model.load_vlm
    monkeypatch.setattr(medsynapse_model, "load_vlm", recording_load_vlm)
    config = _config(tiny_env, tmp_path / "run")
    out = train_sft(config)
    trained = loaded[0][0]  # the very module objects that were trained (peft injects LoRA in place)

    initial = _fresh_lora_model(tiny_env, config).vlm.get_base_model()
    base, _ = load_vlm(tiny_env.vlm, dtype="float32")
    base_params = dict(base.named_parameters())
    initial_params = dict(initial.named_parameters())
    n_lora = n_frozen = n_vision = 0
    for name, param in trained.named_parameters():
        if "lora_" in name:
            n_lora += 1
            moved = (param - initial_params[name]).abs().max().item()
            assert moved > 1e-4, f"LoRA tensor {name} did not move ({moved})"  # ~ lr x steps; bit-exact otherwise
        else:
            n_frozen += 1
            n_vision += ".visual." in f".{name}"
            assert torch.equal(param, base_params[name.replace(".base_layer", "")]), f"{name} changed"
    assert n_lora == 2 * 3 * 2 and n_vision > 0 and n_frozen == len(base_params)  # A and B x 3 projections x 2 layers

    checkpoint = load_file(str(out / "checkpoints" / "step_0000004" / "weights.safetensors"))
    assert checkpoint and all("lora_" in name for name in checkpoint)  # only the adapter was trainable
    assert any((out / "sft").iterdir())  # TensorBoard event file


def test_loss_goes_down_on_a_fixed_batch(tiny_env, tmp_path):
    config = _config(tiny_env, tmp_path / "fit", batch_size=12, max_steps=12, save_every=100, lr=1e-2, **FIXED)

    def loss_of(model):
        data = training_dataset(config.train_file, model.prompts, config.families, config.answer_types, True)
        assert len(data) == config.batch_size
        batch = model.prompts.collate([data.encoded(i) for i in range(len(data))])
        with torch.no_grad():
            return float(sft_loss(model.vlm, batch, model.latent_id))

    before = loss_of(_fresh_lora_model(tiny_env, config).eval())
    after = loss_of(MedSynapseV.from_pretrained(train_sft(config), merge_adapter=True))
    assert after < before - 1.0, (before, after)  # measured: 6.20 -> 4.34


def test_answer_window_loss_equals_the_full_logits_loss(tiny_env):
    config = _config(tiny_env, "unused", lora_targets=["q_proj", "v_proj"])
    model = _fresh_lora_model(tiny_env, config).eval()
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    samples = read_samples(tiny_env.train_file)
    captions = [s for s in samples if s.answer_type == "caption"]
    samples = [s for s in samples if s.answer_type != "caption"][:4] + captions[:1]  # one-token answers, one long
    items = [model.prompts.encode([load_image(s.images[0], s)], s.question, s.answer) for s in samples]
    assert len({len(item.answer_ids) for item in items}) > 1  # the window holds prompt tokens of short answers
    batch = model.prompts.collate(items)
    with torch.no_grad():
        full = forward_with_memory(model.vlm, batch, None, model.latent_id).logits
        for reduction in ("token", "sample", "sum"):
            expected = answer_nll(full, batch.labels, reduction)
            got = sft_loss(model.vlm, batch, model.latent_id, reduction=reduction)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert expected > 0


def test_resume_after_interruption_gives_identical_adapter(tiny_env, tmp_path):
    train_sft(_config(tiny_env, tmp_path / "straight", max_steps=5))
    straight = load_file(str(tmp_path / "straight" / ADAPTER))

    with pytest.raises(Interrupted):  # like a kill: step 3's work is lost, the step-2 checkpoint survives
        train_sft(_config(tiny_env, tmp_path / "resumed", max_steps=5), on_step=crash_at(3))
    assert not (tmp_path / "resumed" / ADAPTER).exists()
    steps: list[int] = []
    train_sft(_config(tiny_env, tmp_path / "resumed", max_steps=5, resume=True), on_step=steps.append)
    assert steps == [3, 4, 5]  # continued from the step-2 checkpoint, not from scratch
    resumed = load_file(str(tmp_path / "resumed" / ADAPTER))
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_saved_folder_loads_without_memory_and_answers(tiny_env, tmp_path):
    out = train_sft(_config(tiny_env, tmp_path / "s", max_steps=2, lr=1e-2))
    manifest = json.loads((out / "medsynapse.json").read_text())
    assert manifest["sampler"] is None and manifest["encoder"] is None and manifest["autonomous"] is None
    assert manifest["adapter"] == "adapter" and manifest["vlm"]["name"] == tiny_env.vlm.name
    with pytest.warns(UserWarning, match="adapter is not used"):
        assert base_vlm_path(out) == str(tiny_env.vlm)  # found again through the hash-checked search path

    merged = MedSynapseV.from_pretrained(out, merge_adapter=True)
    unmerged = MedSynapseV.from_pretrained(out)
    assert merged.n_memory == 0 and merged.sampler is None and merged.encoder is None and merged.autonomous is None
    assert not merged.has_adapter and unmerged.has_adapter
    base, _ = load_vlm(tiny_env.vlm, dtype="float32")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(merged.vlm.named_parameters())[name], dict(base.named_parameters())[name])

    samples = [s for s in read_samples(tiny_env.test_file) if s.answer_type == "yes_no"][:2]
    images = [load_image(s.images[0], s) for s in samples]
    questions = [s.question for s in samples]
    answers = merged.answer(images, questions, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers == unmerged.answer(images, questions, max_new_tokens=4)  # merging changes no greedy answer


def test_model_folder_gives_its_base_vlm_and_the_example_config_loads(tiny_env, tmp_path):
    assert base_vlm_path(tiny_env.vlm) == str(tiny_env.vlm)
    (tmp_path / "medsynapse.json").write_text(json.dumps({"vlm": "/models/base", "adapter": "adapter"}))
    with pytest.warns(UserWarning, match="adapter is not used"):
        assert base_vlm_path(tmp_path) == "/models/base"

    from medsynapse.cli import build_parser

    assert build_parser().parse_args(["train", "sft", "--config", "x.yaml"]).stage == "sft"
