"""Stage I recipe: trains P_phi only, checkpoints in safetensors, and resumes exactly after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Interrupted, crash_at, stage1_config
from safetensors.torch import load_file

from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.recipes.stage1_warmup import train_stage1


def test_resume_after_interruption_gives_identical_weights(tiny_env, tmp_path):
    train_stage1(stage1_config(tiny_env, tmp_path / "straight"))
    straight = load_file(str(tmp_path / "straight" / "sampler.safetensors"))

    with pytest.raises(Interrupted):  # like a kill: step 5's work is lost, the step-4 checkpoint survives
        train_stage1(stage1_config(tiny_env, tmp_path / "resumed"), on_step=crash_at(5))
    assert not (tmp_path / "resumed" / "sampler.safetensors").exists()
    train_stage1(stage1_config(tiny_env, tmp_path / "resumed", resume=True))
    resumed = load_file(str(tmp_path / "resumed" / "sampler.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_stage1_trains_only_the_sampler_and_saves_a_loadable_folder(tiny_env, tmp_path):
    out = train_stage1(stage1_config(tiny_env, tmp_path / "s1", max_steps=3))
    manifest = json.loads((out / "medsynapse.json").read_text())
    assert manifest["sampler"]["n_memory"] == 4
    assert (out / "checkpoints").is_dir()
    assert any((out / "stage1").iterdir())  # TensorBoard event file
    loaded = MedSynapseV.from_pretrained(out)
    fresh = MedSynapseV.from_pretrained(tiny_env.vlm)
    for (name, p), (_, q) in zip(loaded.vlm.named_parameters(), fresh.vlm.named_parameters()):
        assert torch.equal(p, q), f"VLM weight {name} changed in Stage I"
    initial = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32)
    moved = [not torch.equal(a, b) for a, b in zip(loaded.sampler.state_dict().values(),
                                                   initial.sampler.state_dict().values())]
    assert any(moved)


def test_stage1_loss_goes_down(tiny_env, tmp_path):
    """A few dozen steps on a fixed small set must fit it better than the initial sampler."""
    from medsynapse.data.dataset import VQADataset
    from medsynapse.data.schema import read_samples
    from medsynapse.recipes.priors import prior_table

    def mean_loss(model):
        samples = [s for s in read_samples(tiny_env.train_file) if s.answer_type != "caption"][:16]
        data = VQADataset(samples, model.prompts)
        priors, rows = prior_table(model.prior, model.encoder_path, data)
        batch = model.prompts.collate([data.encoded(i) for i in range(len(samples))])
        with torch.no_grad():
            return float(model.forward(batch, model.memory(priors.select([r for rs in rows for r in rs]))).loss)

    before = mean_loss(MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32))
    out = train_stage1(stage1_config(tiny_env, tmp_path / "fit", max_steps=30, batch_size=8, lr=3e-3, save_every=100))
    after = mean_loss(MedSynapseV.from_pretrained(out))
    assert after < before - 0.1
