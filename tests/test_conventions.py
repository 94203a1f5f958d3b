"""Conventions: `report_to` picks accelerate's tracker (none writes no tracker files, a missing package is one clear
error), and every saved folder carries a model card that `medsynapse eval` fills in, the folder loading as before."""

from __future__ import annotations

import pytest

from medsynapse.model.card import CARD
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
from medsynapse.recipes.trainer import check_report_to


def _stage1(tiny_env, out, **settings):
    return Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                        output_dir=str(out), n_memory=4, sampler_width=32, batch_size=4, max_steps=2,
                        answer_types=["yes_no"], **settings)


def _tracker_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith("events.out.tfevents")]


def test_report_to_none_writes_no_tracker_files_and_tensorboard_does(tiny_env, tmp_path):
    train_stage1(_stage1(tiny_env, tmp_path / "none", report_to="none"))
    train_stage1(_stage1(tiny_env, tmp_path / "tb"))
    assert _tracker_files(tmp_path / "tb") and not _tracker_files(tmp_path / "none")
    with pytest.raises(ValueError, match="expected one of"):
        check_report_to("neptune")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:  # not a dependency: asked for, it is one clear line
        with pytest.raises(ValueError, match="pip install wandb"):
            train_stage1(_stage1(tiny_env, tmp_path / "wandb", report_to="wandb"))
        assert not (tmp_path / "wandb" / "checkpoints").exists()  # refused before any work


def test_every_saved_folder_has_a_card_that_eval_fills_and_it_still_loads(tiny_env, tmp_path):
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks
    from medsynapse.model.medsynapse import MedSynapseV

    folder = train_stage1(_stage1(tiny_env, tmp_path / "s1", report_to="none"))
    card = (folder / CARD).read_text()
    assert "MedSynapse-V Stage I" in card and f"- base VLM: `{tiny_env.vlm.name}` (content sha256 `" in card
    assert str(tiny_env.root) not in card  # no absolute path: the folder is copied between machines
    assert "config hash" in card and "not a medical device" in card and "Not evaluated yet" in card
    evaluate_benchmarks(str(folder), ["synthmed"], str(tiny_env.train_file.parent), tmp_path / "eval",
                        EvalSettings(batch_size=8, limit=4))
    card = (folder / CARD).read_text()
    assert "| synthmed | 4 |" in card and "Not evaluated yet" not in card
    MedSynapseV.from_pretrained(folder)  # the card changes nothing the loader reads
    # saved again (e.g. a resumed run finishing), the evaluation table stays
    MedSynapseV.from_pretrained(folder).save_pretrained(folder)
    assert "| synthmed | 4 |" in (folder / CARD).read_text()
    plain = tiny_env.vlm
    evaluate_benchmarks(str(plain), ["synthmed"], str(tiny_env.train_file.parent), tmp_path / "eval_plain",
                        EvalSettings(batch_size=8, limit=2))
    assert not (plain / CARD).exists()  # a plain VLM folder is not written into
