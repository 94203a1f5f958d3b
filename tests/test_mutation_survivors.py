"""Tests written from the survivors of the mutation sample over cli, engines, steps, the top level and recipes (run
2026-12-04, docs/testing.md): each states a behaviour a surviving one-line mutation broke."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynapse.config import ConfigError
from medsynapse.demo import claims
from medsynapse.inspection import format_report
from medsynapse.runconfig import read_run_config
from medsynapse.values import baseline_origins

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _stages(base: float, teacher: float, student: float, presence: tuple[float, float, float]) -> dict:
    rows = {}
    for name, accuracy, present in (("base", base, presence[0]), ("stage3_teacher", teacher, presence[1]),
                                    ("stage3_student", student, presence[2]), ("stage2", teacher, presence[1])):
        rows[name] = {"accuracy": accuracy, "by_question_type": {"presence": {"accuracy": present}}}
    return rows


def test_the_students_gain_retention_is_its_gain_over_the_teachers_gain():
    found = claims(_stages(0.5, 0.7, 0.6, (0.6, 0.9, 0.75)), {"stage3_student": {"ratio_to_base": 0.98}})
    assert found["student_gain_retention"] == pytest.approx(0.1 / 0.2)
    assert found["student_gain_retention_presence"] == pytest.approx(0.15 / 0.3)
    assert found["student_latency_ratio"] == 0.98
    assert claims(_stages(0.5, 0.5, 0.6, (0.6, 0.6, 0.7)), {})["student_gain_retention"] is None  # no gain: none


def test_the_inspect_table_prints_millions_and_billions():
    result = {"architecture": "Qwen3-VL", "hidden_size": 4096, "parameters": {"vlm": 8_767_000_000, "lora": 61_300_000},
              "settings": {"vlm": "meta", "lora": "r 64"},
              "stages": {"stage2": {"trainable": {"lora": 61_300_000}, "frozen_total": 8_767_000_000,
                                    "weights_and_optimizer_gib": 17.25}}}
    text = format_report(result)
    assert "| vlm | 8,767.0 M | meta |" in text and "| lora | 61.3 M | r 64 |" in text
    assert "| stage2 | lora 61.3 M | 8.77 B | 17.2 |" in text


def test_a_baselines_values_are_named_where_they_come_from():
    run = read_run_config(CONFIGS / "synthmed.yaml")
    origins = baseline_origins(run, "sft")
    for key in ("lr", "batch_size", "max_steps", "warmup_ratio", "seed"):  # Stage I's, unless the section sets it
        assert origins.get(key, "set") in (f"{run.source}.stage1.{key}", "set"), key
    assert origins["max_steps"] == f"{run.source}.stage1.max_steps"
    assert origins["lora_r"] == f"{run.source}.model.lora_r"


@pytest.mark.parametrize("key", ["model.vlm", "model.encoder", "data.stage1_file", "data.stage2_file"])
def test_the_demo_refuses_a_folder_it_fills_in_naming_the_key(key):
    from medsynapse.steps.synthmed import demo_settings

    run = read_run_config(CONFIGS / "synthmed.yaml", [f"{key}=somewhere"])
    with pytest.raises(ConfigError) as raised:
        demo_settings(run)
    assert str(raised.value) == f"{run.source}.{key}: the demo builds and fills it in (SynthMed); leave it empty"


def test_the_base_preparation_without_grounding_needs_no_masks_and_trains_the_language_model(tiny_env, tmp_path):
    """The defaults (no vision steps, grounding weight 0) read no mask: on data without masks the language model
    still trains, and only the auxiliary term stays at 0."""
    import json

    from safetensors.torch import load_file

    from medsynapse.recipes.prepare_base import BasePrepConfig, prepare_base

    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(tiny_env.train_file.parent / "images")
    records = [json.loads(line) for line in tiny_env.train_file.read_text().splitlines()[:8]]
    (data / "train.jsonl").write_text("".join(json.dumps({**r, "mask": None}) + "\n" for r in records))
    out = prepare_base(BasePrepConfig(vlm=str(tiny_env.vlm), train_file=str(data / "train.jsonl"),
                                      output_dir=str(tmp_path / "base"), steps=2, batch_size=2,
                                      families=tuple({r["family"] for r in records})))
    before = {k: v for name in tiny_env.vlm.glob("*.safetensors") for k, v in load_file(name).items()}
    after = {k: v for name in out.glob("*.safetensors") for k, v in load_file(name).items()}
    assert before.keys() == after.keys()
    moved = [k for k in before if not (before[k] == after[k]).all()]
    assert any("language_model" in k for k in moved)


def test_a_sharded_checkpoint_keeps_what_the_recipe_asked_it_to_keep(tmp_path):
    """Stage II's causal-reward record rides in the checkpoint's `extra`; a sharded run resumes from it too. One
    process: torch.distributed.checkpoint writes and reads its shards without a process group."""
    import torch
    from accelerate import Accelerator

    from medsynapse.recipes.trainer import checkpoint, latest_checkpoint, load_checkpoint

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    record = [{"step": 1, "r_causal_mean": 0.00045}, {"step": 2, "r_causal_mean": -0.0012}]
    checkpoint(Accelerator(cpu=True), tmp_path, 2, module, optimizer, scheduler, sharded=True,
               extra={"causal_record": record})
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    state = load_checkpoint(latest_checkpoint(tmp_path), module, optimizer, scheduler, sharded=True)
    assert state["sharded"] is True and state["step"] == 2
    assert state["causal_record"] == record
    for name, value in module.state_dict().items():
        assert torch.equal(value, saved[name])


def test_the_cosine_schedule_warms_up_over_its_ratio_of_the_steps_then_decays_by_value():
    """8 steps, warm-up 0.25: 2 steps of linear warm-up (0, 1/2), then the half cosine from 1 down to 0."""
    import math

    import torch

    from medsynapse.recipes.trainer import cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_schedule(optimizer, 8, 0.25)
    factors = []
    for _ in range(8):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (step - 2) / 6)) for step in range(2, 8)]
    assert factors == pytest.approx(expected, abs=1e-12)


def test_a_fractional_count_is_refused_as_not_an_integer():
    from medsynapse.values import check_value

    with pytest.raises(ConfigError, match=r"^run\.yaml\.stage1\.max_steps: must be an integer, got 2\.5$"):
        check_value("max_steps", 2.5, "run.yaml.stage1.max_steps")


@pytest.mark.parametrize(("key", "value"), [("lora_alpha", 0), ("lora_r", 0)])
def test_a_stage2_value_filled_from_the_model_section_is_named_at_its_key(key, value):
    """Stage II's LoRA comes from the model section: a bad `model.lora_alpha` is named there, where the user wrote
    it, not as a Stage II key the file does not have."""
    from medsynapse.runconfig import run_config_from
    from medsynapse.values import check_run

    run = run_config_from({"model": {key: value}}, "run.yaml")
    with pytest.raises(ConfigError, match=rf"model\.{key}"):
        check_run(run, memory=False)


def test_the_context_length_is_the_text_models_or_the_configs_own():
    from types import SimpleNamespace

    import medsynapse.model.vlm as vlm_module
    from medsynapse.serve import context_length

    def model(config):
        return SimpleNamespace(vlm=SimpleNamespace(config=config))

    original = vlm_module.core_vlm
    vlm_module.core_vlm = lambda vlm: vlm
    try:
        nested = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=4096),
                                 max_position_embeddings=77)
        assert context_length(model(nested)) == 4096
        assert context_length(model(SimpleNamespace(max_position_embeddings=2048))) == 2048  # no text_config
        assert context_length(model(SimpleNamespace())) is None
    finally:
        vlm_module.core_vlm = original


def test_more_workers_than_gpus_is_refused_naming_both(monkeypatch):
    import torch

    from medsynapse.study import Plan, Unit, run_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    unit = Unit("stage1", 0, "k", type("Config", (), {"output_dir": "/nonexistent/unit"})())
    with pytest.raises(ValueError, match=r"^workers: 2 workers need 2 GPUs, this machine shows 1$"):
        run_jobs(Plan({"stage1-s0-k": unit}, {}, {}), workers=2)


# --- from the sample after the demo became a study (2026-12-04, fourth) --------------------------------------------


def test_a_stage2_steps_memory_bound_counts_the_memory_slots_its_prompts_carry():
    """Stage II with memory: every rollout's prompt carries N memory slots (hidden states of N more tokens); GRPO-only
    carries none. Mutation: the memory slots left out of the token count."""
    import re

    from medsynapse.recipes.stage2_ccr import Stage2Config
    from medsynapse.values import VLMShape, step_memory

    shape = VLMShape(hidden=4096, layers=36, vocab=151_936, image_tokens=256, source="test")

    def tokens(use_memory: bool, n_memory: int) -> tuple[int, int]:
        config = Stage2Config(model="m", train_file="t", output_dir="o", use_memory=use_memory)
        total, _, words = step_memory("stage2", config, shape, n_memory=n_memory)
        return int(re.search(r"~(\d+) tokens", words).group(1)), total

    (with_64, bytes_64), (with_0, bytes_0) = tokens(True, 64), tokens(True, 0)
    assert with_64 - with_0 == 64 and bytes_64 > bytes_0
    assert tokens(False, 64) == tokens(False, 0)  # no memory: the slots are not in its prompts


def test_a_stage1_steps_memory_bound_counts_its_memory_slots():
    """Stage I's forward carries the sampler's N memory slots after the prompt: N more tokens of hidden states and
    logits. Mutation: the slots subtracted instead of added."""
    import re

    from medsynapse.recipes.stage1_warmup import Stage1Config
    from medsynapse.values import VLMShape, step_memory

    shape = VLMShape(hidden=4096, layers=36, vocab=151_936, image_tokens=256, source="test")

    def tokens(n_memory: int) -> tuple[int, int]:
        config = Stage1Config(vlm="v", encoder="e", train_file="t", n_memory=n_memory)
        total, _, words = step_memory("stage1", config, shape)
        return int(re.search(r"~(\d+) tokens", words).group(1)), total

    (with_64, bytes_64), (with_0, bytes_0) = tokens(64), tokens(0)
    assert with_64 - with_0 == 64 and bytes_64 > bytes_0


def test_predicts_mip_reaches_the_volume_view():
    """`--mip A B` is the view's maximum-intensity projection over slices A-B. Mutation: the mip left out."""
    from medsynapse.cli import build_parser
    from medsynapse.cli.common import volume_view
    from medsynapse.data.images import VolumeView

    args = build_parser().parse_args(["predict", "--model", "m", "--image", "ct.nii.gz", "--mip", "1", "4",
                                      "--question", "q"])
    assert volume_view(args) == VolumeView(axis="axial", slice=None, mip=(1, 4))


def test_pipeline_on_a_synthmed_run_file_keeps_its_overrides(tmp_path, capsys, monkeypatch):
    """`pipeline --config configs/synthmed.yaml --set ...` is the demo with those settings: a bad one is refused in
    one line before anything is built. Mutation: the overrides dropped (the demo would start with the file's)."""
    from medsynapse.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "synthmed.yaml"
    argv = ["pipeline", "--config", str(config), "--set", f"output={tmp_path / 'run'}", "stage2.lr=.nan",
            f"synthmed.cache_dir={tmp_path / 'cache'}"]

    def refuse(*args, **kwargs):  # reaching the study means the bad setting was not seen
        raise AssertionError("the study started")

    monkeypatch.setattr("medsynapse.study.run_study", refuse)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "synthmed.yaml.stage2.lr: must be a finite number" in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
