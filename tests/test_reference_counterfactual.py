"""The `reference` counterfactual end to end: the bank built by Stages I-II from training images without a finding,
saved with the model and read back, M' = P_phi(nearest reference), and Stage II scoring with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import stage1_config

from medsynapse.data.dataset import VQADataset
from medsynapse.data.schema import read_samples
from medsynapse.model.counterfactual import nearest_reference, reference_bank
from medsynapse.model.encoders import load_encoder
from medsynapse.model.medsynapse import REFERENCE_BANK, MedSynapseV
from medsynapse.model.processor import ModelNotFoundError
from medsynapse.recipes.priors import prior_table
from medsynapse.recipes.stage1_warmup import train_stage1
from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2


@pytest.fixture(scope="module")
def split_encoder(tiny_env, tmp_path_factory):
    """The tiny env's encoder with its threshold at the median of the train images' most confident pixel, so about
    half of them have a finding (the random encoder's probabilities all sit near 0.485)."""
    folder = tmp_path_factory.mktemp("split_encoder") / "encoder"
    shutil.copytree(tiny_env.encoder, folder)
    encoder = load_encoder(folder)
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    images = [dataset.images(i)[0] for i in range(len(dataset.samples))]
    with torch.no_grad():
        peak = torch.sigmoid(encoder(encoder.preprocess(images))[1]).amax((1, 2, 3)).unique()
    config = json.loads((folder / "config.json").read_text())
    config["threshold"] = float(peak.median())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def stage1_dir(tiny_env, split_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1_reference")
    train_stage1(stage1_config(tiny_env, out, encoder=str(split_encoder), max_steps=2, reference_bank_size=3))
    return out


def test_stage1_saves_the_bank_of_training_images_without_a_finding(tiny_env, split_encoder, stage1_dir):
    encoder = load_encoder(split_encoder)
    table, _ = prior_table(encoder.encode, None, VQADataset(read_samples(tiny_env.train_file), prompts=None))
    assert 0 < int(table.finding.sum()) < len(table.finding)  # both kinds of image exist
    model = MedSynapseV.from_pretrained(stage1_dir)
    expected = reference_bank(table.tokens, table.finding, 3)
    assert model.reference_bank.shape[0] == 3
    torch.testing.assert_close(model.reference_bank, expected, atol=1e-6, rtol=1e-6)
    healthy = table.tokens[~table.finding]
    for entry in model.reference_bank:  # every entry is an image the encoder found nothing in
        assert min(float((entry - h).abs().max()) for h in healthy) < 1e-6


def test_counterfactual_memory_with_reference_is_the_memory_of_the_nearest_reference(tiny_env, stage1_dir):
    model = MedSynapseV.from_pretrained(stage1_dir)
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    first = {sample.images[0]: i for i, sample in reversed(list(enumerate(dataset.samples)))}  # one per image
    images = [dataset.images(i)[0] for i in first.values()]
    prior = model.prior(images)
    with torch.no_grad():
        counterfactual = model.memory(prior, "counterfactual", "reference")
        factual = model.memory(prior)
        expected = model.sampler(nearest_reference(prior.tokens, prior.grid, prior.region_mask, prior.finding,
                                                   model.reference_bank), prior.grid)
    torch.testing.assert_close(counterfactual, expected, atol=0, rtol=0)
    healthy = ~prior.finding
    assert healthy.any() and prior.finding.any()
    torch.testing.assert_close(counterfactual[healthy], factual[healthy], atol=0, rtol=0)  # nothing to remove
    assert (counterfactual[prior.finding] - factual[prior.finding]).abs().amax() > 1e-4


def test_a_missing_or_damaged_bank_is_one_error_naming_the_file(tiny_env, split_encoder, stage1_dir, tmp_path):
    from medsynapse.model.bases import BaseFolders

    folder = tmp_path / "model"
    shutil.copytree(stage1_dir, folder)  # a copied folder finds its bases through the search path: given here
    bases = BaseFolders(vlm=str(tiny_env.vlm), encoder=str(split_encoder))
    (folder / REFERENCE_BANK).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=REFERENCE_BANK):
        MedSynapseV.from_pretrained(folder, bases=bases)
    (folder / REFERENCE_BANK).unlink()
    with pytest.raises(ModelNotFoundError, match=REFERENCE_BANK):
        MedSynapseV.from_pretrained(folder, bases=bases)


def test_a_model_without_a_bank_refuses_the_reference_counterfactual(model, tiny_env):
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    prior = model.prior([dataset.images(0)[0]])
    assert model.reference_bank is None
    with pytest.raises(ValueError, match="reference_bank.safetensors"):
        model.memory(prior, "counterfactual", "reference")


def test_stage2_scores_with_the_reference_memory_and_saves_its_own_bank(tiny_env, stage1_dir, tmp_path):
    from medsynapse.recipes import stage2_ccr

    seen = []
    original = stage2_ccr.factual_and_counterfactual_logprobs

    def recorded(policy, batch, memory, memory_cf, *args, **kwargs):
        seen.append((memory.clone(), memory_cf.clone()))
        return original(policy, batch, memory, memory_cf, *args, **kwargs)

    out = tmp_path / "s2"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(stage2_ccr, "factual_and_counterfactual_logprobs", recorded)
        train_stage2(Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file), output_dir=str(out),
                                  lora_r=4, lora_alpha=8, group_size=2, batch_size=4, max_steps=3, save_every=100,
                                  lr=1e-3, max_new_tokens=3, intervention="reference", reference_bank_size=2))
    memories = torch.cat([m for m, _ in seen]), torch.cat([c for _, c in seen])
    same = (memories[0] - memories[1]).abs().flatten(1).amax(1) == 0
    assert same.any() and not same.all()  # M' = M exactly for images without a finding, else another memory
    assert MedSynapseV.from_pretrained(out).reference_bank.shape[0] == 2  # rebuilt from its own training set


def test_stage2_refuses_an_intervention_that_needs_the_images(tiny_env, stage1_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot train Stage II"):
        train_stage2(Stage2Config(model=str(stage1_dir), train_file=str(tiny_env.train_file),
                                  output_dir=str(tmp_path / "s2"), intervention="pixels"))
