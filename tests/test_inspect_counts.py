"""`medsynapse inspect` counts the modules the run trains: for both paper configs, each trained module's count equals
the module built on the meta device from the settings `medsynapse train` resolves (runconfig.resolve), P_phi at the
chosen SAM 3 level's width, A_psi with the pooling Stage III resolves to, the LoRA from the VLM config's shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import Qwen3VLConfig, Sam3Config

from medsynapse import inspection as inspect
from medsynapse.config import ConfigError
from medsynapse.model.encoders.sam3 import Sam3Settings
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    count_parameters,
)
from medsynapse.runconfig import read_run_config, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = ["medsynapse-v-8b.yaml", "medsynapse-v-4b.yaml"]


def lora_count(text, r: int, targets: list[str]) -> int:
    """peft's LoRA on the language model: r * (in + out) per targeted projection, from the text config's shapes."""
    h, inner = text.hidden_size, text.intermediate_size
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inner), "up_proj": (h, inner), "down_proj": (inner, h)}
    return text.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)


def trained_counts(run) -> dict:
    """What the recipes build: Stage I's P_phi, Stage II's LoRA, Stage III's A_psi (N and images from P_phi)."""
    s1, s2, s3 = (resolve(run, stage) for stage in ("stage1", "stage2", "stage3"))
    text = Qwen3VLConfig(**inspect.PRESETS[run.model.architecture]).text_config  # no /models folders here
    vision = Sam3Config().vision_config  # SAM 3's published sizes
    level = run.model.encoder_feature_level
    prior_dim = vision.backbone_config.hidden_size if level == "vit" else vision.fpn_hidden_size
    with torch.device("meta"):
        sampler = DiagnosticMemorySampler(SamplerConfig(
            prior_dim=prior_dim, hidden_size=text.hidden_size, n_memory=s1.n_memory, width=s1.sampler_width,
            layers=s1.sampler_layers, heads=s1.sampler_heads, max_images=s1.max_images))
        autonomous = AutonomousMemoryModule(AutonomousConfig(
            hidden_size=text.hidden_size, n_memory=s1.n_memory, mlp_hidden=s3.mlp_hidden, pooling=s3.pooling,
            attention_dim=s3.attention_dim, max_images=s1.max_images))
    return {"sampler": count_parameters(sampler), "lora": lora_count(text, s2.lora_r, s2.lora_targets),
            "autonomous": count_parameters(autonomous)}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_inspect_counts_the_modules_each_stage_trains(name):
    run = read_run_config(CONFIGS / name)
    assert (run.model.encoder_feature_level, run.model.prior_dim) == ("fpn_1x", 256)  # chosen, and its width
    result = inspect.report(inspect.from_run(run))
    expected = trained_counts(run)
    counts = result["parameters"]
    assert {k: counts[k] for k in expected} == expected
    stages = result["stages"]
    assert (stages["stage1"]["trainable"], stages["stage2"]["trainable"], stages["stage3"]["trainable"]) == (
        {"sampler": expected["sampler"]}, {"lora": expected["lora"]}, {"autonomous": expected["autonomous"]})
    assert f"{resolve(run, 'stage3').pooling} pooling" in result["settings"]["autonomous"]
    assert "prior_dim 256 (fpn_1x)" in result["settings"]["sampler"]


@pytest.mark.parametrize("overrides", [
    ["stage3.pooling=attention", "stage3.attention_dim=128"],
    ["stage3.pooling=grid", "stage3.mlp_hidden=1024"],
    ["stage1.sampler_width=512", "stage1.max_images=1", "stage2.lora_r=16",
     "stage2.lora_targets=[q_proj, v_proj, gate_proj]", "model.encoder_feature_level=vit", "model.prior_dim=1024"],
])
def test_inspect_follows_the_stage_sections(overrides):
    run = read_run_config(CONFIGS / "medsynapse-v-8b.yaml", overrides)
    counts = inspect.report(inspect.from_run(run))["parameters"]
    expected = trained_counts(run)
    assert {k: counts[k] for k in expected} == expected


def test_prior_dim_must_be_the_chosen_levels_width():
    path = CONFIGS / "medsynapse-v-8b.yaml"

    def prior_dim(*overrides):
        return inspect.prior_dim(inspect.from_run(read_run_config(path, list(overrides))))

    assert prior_dim() == 256 and prior_dim("model.encoder_feature_level=vit", "model.prior_dim=1024") == 1024
    assert prior_dim("model.encoder_feature_level=''", "model.prior_dim=1024") == 1024  # no level chosen: as given
    with pytest.raises(ConfigError, match=r"medsynapse-v-8b\.yaml\.model\.prior_dim: 1024, but encoder_feature_level "
                                          r"'fpn_1x' has 256 channels"):
        prior_dim("model.prior_dim=1024")
    with pytest.raises(ConfigError, match=r"encoder_feature_level: unknown SAM 3 feature_level 'fpn_3x'"):
        prior_dim("model.encoder_feature_level=fpn_3x")
    with pytest.raises(ConfigError, match=r"encoder_kind is 'sam-vit-b'"):
        prior_dim("model.encoder_kind=sam-vit-b")


def test_an_encoder_folder_at_another_level_is_refused(tmp_path):
    folder = tmp_path / "sam3"
    Sam3Config().save_pretrained(folder)  # config.json of a Sam3Model folder (no weights needed)
    config = dataclasses.replace(inspect.from_run(read_run_config(CONFIGS / "medsynapse-v-8b.yaml")),
                                 encoder=str(folder))
    assert inspect.prior_dim(config) == 256  # no settings file: the code default, fpn_1x
    Sam3Settings(feature_level="vit").save(folder)
    with pytest.raises(ConfigError, match=r"'fpn_1x', but the encoder folder .*sam3 computes 'vit'"):
        inspect.prior_dim(config)
