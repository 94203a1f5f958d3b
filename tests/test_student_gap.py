"""Stage III's remedies for the student's gap (issue 31), each off by default: the JSD on the answer's first position
only (`jsd_positions: first`) and the LoRA adapted to A_psi's memory after the distillation (`adapt_steps`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.objectives.jsd import first_positions
from medsynapse.recipes import stage3_imt, trainer
from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3


def _config(tiny_env, stage2_dir, out, **kw) -> Stage3Config:
    base = dict(model=str(stage2_dir), train_file=str(tiny_env.train_file), output_dir=str(out), batch_size=4,
                max_steps=2, save_every=2, lr=1e-3, max_new_tokens=3, log_every=1, report_to="none")
    return Stage3Config(**{**base, **kw})


def test_first_positions_keeps_each_rows_first_valid_position_by_value():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert first_positions(mask).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert first_positions(mask.bool()).dtype == torch.bool


@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=7), min_size=1, max_size=5).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_first_positions_is_one_position_per_non_empty_row_inside_the_mask(rows):
    mask = torch.tensor(rows)
    first = first_positions(mask)
    assert (first <= mask).all()  # inside the mask
    assert first.sum(1).tolist() == [int(any(r)) for r in rows]  # one per row that has any
    for row, kept in zip(rows, first.tolist()):
        if any(row):
            assert kept.index(True) == row.index(True)


def _masks_seen(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    jsd = stage3_imt.generalized_jsd

    def recording(student, teacher, mask, *args, **kwargs):
        seen.append(mask.detach().clone())
        return jsd(student, teacher, mask, *args, **kwargs)

    monkeypatch.setattr(stage3_imt, "generalized_jsd", recording)
    return seen


def test_jsd_positions_first_takes_the_jsd_on_the_first_answer_position_of_the_same_trajectories(
        tiny_env, stage2_dir, tmp_path, monkeypatch):
    """The same first step (same A_psi, batch and on-policy trajectories): `first` averages the JSD over exactly the
    first valid position of each trajectory that `all` averages over every valid position of."""
    seen = _masks_seen(monkeypatch)
    train_stage3(_config(tiny_env, stage2_dir, tmp_path / "all", max_steps=1, save_every=1))
    train_stage3(_config(tiny_env, stage2_dir, tmp_path / "first", max_steps=1, save_every=1, jsd_positions="first"))
    every, first = seen
    assert every.sum() > first.sum() > 0  # trajectories longer than one token: the choice matters here
    assert torch.equal(first, first_positions(every))


def test_adapt_steps_train_the_lora_on_the_students_memory_and_leave_a_psi_as_distilled(tiny_env, stage2_dir,
                                                                                         tmp_path):
    """Same seed and steps with and without the adaptation: A_psi is bit for bit the distilled one either way; the
    LoRA is the teacher's without it and moved with it; more than one process is refused (checked in the recipe)."""
    plain = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "plain"))
    adapted = train_stage3(_config(tiny_env, stage2_dir, tmp_path / "adapted", adapt_steps=3, adapt_lr=1e-2))
    a_psi = {name: load_file(str(folder / "autonomous.safetensors")) for name, folder in
             (("plain", plain), ("adapted", adapted))}
    assert a_psi["plain"].keys() == a_psi["adapted"].keys()
    assert all(torch.equal(a_psi["plain"][k], a_psi["adapted"][k]) for k in a_psi["plain"])

    def lora(folder) -> dict[str, torch.Tensor]:
        model = MedSynapseV.from_pretrained(folder, dtype="float32")
        return {k: v.detach().clone() for k, v in model.vlm.named_parameters() if "lora_" in k}

    teacher, kept, moved = lora(stage2_dir), lora(plain), lora(adapted)
    assert teacher.keys() == kept.keys() == moved.keys() and teacher
    assert all(torch.equal(teacher[k], kept[k]) for k in teacher)
    change = max(float((moved[k] - teacher[k]).abs().max()) for k in teacher)
    assert change > 1e-3, change  # Adam's steps of ~lr: far above float noise


def test_one_adaptation_step_is_adamw_on_the_answer_loss_with_the_students_memory(tiny_env, stage2_dir, tmp_path):
    """By value: `adapt_lora`'s first step equals a hand-made AdamW step (clipped gradient of the answer loss, A_psi's
    memory in the slots, the batch after the distillation's last) on a copy of the same model."""
    from medsynapse.data.dataset import training_dataset
    from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule
    from medsynapse.model.vlm import core_vlm, vision_features

    config = _config(tiny_env, stage2_dir, tmp_path / "unused", adapt_steps=1, adapt_lr=1e-2, dtype="float64")

    def fresh() -> MedSynapseV:
        torch.manual_seed(0)
        model = MedSynapseV.from_pretrained(stage2_dir, dtype="float64")
        hidden = model.vlm.get_base_model().config.text_config.hidden_size
        model.autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=model.n_memory))
        model.autonomous.double()
        model.vlm.requires_grad_(False).eval()
        return model

    class OneProcess:
        device, is_main_process = torch.device("cpu"), True

        def log(self, *args, **kwargs):
            pass

    model = fresh()
    losses = stage3_imt.adapt_lora(model, model.autonomous, config, OneProcess())
    by_hand = fresh()
    dataset = training_dataset(config.train_file, by_hand.prompts, config.families, config.answer_types,
                               with_answers=True)
    indices = trainer.global_batch_indices(len(dataset), config.batch_size, config.max_steps, config.seed)
    batch = by_hand.prompts.collate([dataset.encoded(i) for i in indices], with_answers=True)
    lora = [p for name, p in by_hand.vlm.named_parameters() if "lora_" in name]
    for parameter in lora:
        parameter.requires_grad_(True)
    merge = core_vlm(by_hand.vlm).config.vision_config.spatial_merge_size
    with torch.no_grad():
        features = vision_features(by_hand.vlm, batch)
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
        memory = by_hand.autonomous(features.pooler_output, grids, batch.images_per_sample)
    loss = trainer.answer_loss(by_hand.vlm, batch, memory, by_hand.latent_id, features)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora, config.grad_clip)
    torch.optim.AdamW(lora, lr=1e-2, weight_decay=config.weight_decay).step()
    assert losses == [loss.item()]
    expected = dict(zip([n for n, _ in by_hand.vlm.named_parameters() if "lora_" in n], lora))
    got = {n: p for n, p in model.vlm.named_parameters() if "lora_" in n}
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not any(p.requires_grad for p in got.values())  # frozen again for saving


def test_bad_remedy_values_are_refused_before_anything_loads(tiny_env, stage2_dir, tmp_path):
    with pytest.raises(ValueError, match="adapt_steps"):
        train_stage3(_config(tiny_env, stage2_dir, tmp_path / "bad", adapt_steps=-1))
    with pytest.raises(ValueError, match="adapt_lr"):
        train_stage3(_config(tiny_env, stage2_dir, tmp_path / "bad", adapt_steps=1, adapt_lr=float("nan")))
    assert not (tmp_path / "bad").exists()
