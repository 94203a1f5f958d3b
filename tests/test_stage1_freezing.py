"""Stage I's own freezing, checked on the recipe's in-memory model: the VLM and the prior encoder get no gradient and
do not change, and the optimizer holds exactly P_phi's parameters."""

from __future__ import annotations

import torch

from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.recipes import trainer
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1


def test_stage1_freezes_the_vlm_and_encoder_itself(tiny_env, tmp_path, monkeypatch):
    built, optimizers = [], []
    build, adamw = MedSynapseV.build.__func__, trainer.adamw

    def spy_build(cls, *args, **kwargs):
        model = build(cls, *args, **kwargs)
        frozen = {f"vlm.{n}": p.detach().clone() for n, p in model.vlm.named_parameters()}
        frozen |= {f"encoder.{n}": p.detach().clone() for n, p in model.encoder.named_parameters()}
        built.append((model, frozen, {n: p.detach().clone() for n, p in model.sampler.named_parameters()}))
        return model

    def spy_adamw(module, lr, weight_decay):
        optimizers.append(adamw(module, lr, weight_decay))
        return optimizers[-1]

    monkeypatch.setattr(MedSynapseV, "build", classmethod(spy_build))
    monkeypatch.setattr(trainer, "adamw", spy_adamw)
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder),
                              train_file=str(tiny_env.train_file), output_dir=str(tmp_path / "s1"), n_memory=4,
                              sampler_width=32, batch_size=4, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                              answer_types=["yes_no", "multiple_choice"]))
    (model, frozen, sampler_before), = built
    (optimizer,) = optimizers

    after = dict(model.vlm.named_parameters(prefix="vlm")) | dict(model.encoder.named_parameters(prefix="encoder"))
    assert after.keys() == frozen.keys()
    for name, p in after.items():
        assert not p.requires_grad and p.grad is None, f"{name} is not frozen"
        assert torch.equal(p, frozen[name]), f"{name} changed in Stage I"
    assert not model.vlm.training  # no dropout in the frozen VLM

    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.sampler.parameters()}
    for name, p in model.sampler.named_parameters():
        assert p.requires_grad
        assert not torch.equal(p, sampler_before[name]), f"sampler {name} did not train"
