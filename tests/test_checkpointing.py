"""Non-reentrant activation checkpointing changes memory, not results: every stage computes the same gradients at
every step and trains the same weights.

Comparing the weights alone after one effective Adam step would be blind to a checkpointed backward that scaled
every gradient by the same factor (Adam's first step is sign-like), so the gradients reaching the optimiser are
recorded at each of several steps and compared directly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2
from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3


def assert_same(a_file, b_file):
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys() and a
    for name in a:
        # recomputation replays the same kernels; 1e-6 absorbs summation-order differences in backward
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


STEPS = 4


def record_gradients(monkeypatch, store: list) -> None:
    """Wrap AdamW.step so each optimiser step first records a copy of every gradient it is about to apply."""
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        store.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]
                      if p.grad is not None])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.fixture(scope="module")
def runs(tiny_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    gradients = {}
    for flag in (False, True):
        with pytest.MonkeyPatch.context() as monkeypatch:
            gradients[flag] = []
            record_gradients(monkeypatch, gradients[flag])
            train_all_stages(tiny_env, root, flag)
    return root, gradients


def train_all_stages(tiny_env, root, flag):
    out = root / str(flag)
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder),
                              train_file=str(tiny_env.train_file), output_dir=str(out / "s1"), n_memory=4,
                              sampler_width=32, batch_size=4, max_steps=STEPS, lr=1e-3,
                              gradient_checkpointing=flag))
    train_stage2(Stage2Config(model=str(root / "False" / "s1"), train_file=str(tiny_env.train_file),
                              output_dir=str(out / "s2"), lora_r=4, lora_alpha=8, group_size=2, batch_size=2,
                              max_steps=STEPS, max_new_tokens=3, lr=1e-3, gradient_checkpointing=flag))
    train_stage3(Stage3Config(model=str(root / "False" / "s2"), train_file=str(tiny_env.train_file),
                              output_dir=str(out / "s3"), batch_size=4, max_steps=STEPS, max_new_tokens=3, lr=1e-3,
                              gradient_checkpointing=flag))


@pytest.mark.parametrize("relative", ["s1/sampler.safetensors", "s2/adapter/adapter_model.safetensors",
                                      "s3/autonomous.safetensors"])
def test_checkpointing_trains_the_same_weights(runs, relative):
    root, _ = runs
    assert_same(root / "False" / relative, root / "True" / relative)


def test_checkpointing_computes_the_same_gradients_at_every_step(runs):
    _, gradients = runs
    plain, checkpointed = gradients[False], gradients[True]
    assert len(plain) == len(checkpointed) == 3 * STEPS  # three stages, every step recorded
    for step, (a, b) in enumerate(zip(plain, checkpointed)):
        assert len(a) == len(b) and a, step
        norm = torch.cat([g.flatten() for g in a]).norm()
        assert norm > 1e-4, f"step {step}: no gradient to compare"
        for ga, gb in zip(a, b):
            # replayed kernels, summation order only: far below any change a wrong backward would make
            torch.testing.assert_close(gb, ga, atol=1e-6 * max(1.0, float(norm)), rtol=1e-5, msg=f"step {step}")


def test_checkpointing_is_really_on(tiny_env):
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.vlm import core_vlm
    from medsynapse.recipes.trainer import enable_activation_checkpointing

    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
    enable_activation_checkpointing(model.vlm)
    layers = core_vlm(model.vlm).model.language_model.layers
    assert layers and all(layer.gradient_checkpointing for layer in layers)
