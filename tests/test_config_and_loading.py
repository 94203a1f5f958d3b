"""Strict configs, local-only model loading, the processor type, and the encoder interface."""

from __future__ import annotations

import time

import pytest
import torch

from medsynapse.config import ConfigError, load_config
from medsynapse.model.encoders import TinySegEncoder, load_encoder, top_region
from medsynapse.model.vlm import ImageOnlyQwen3VLProcessor, ModelNotFoundError, load_vlm
from medsynapse.recipes.stage1_warmup import Stage1Config


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vlm: x\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(Stage1Config, path)


def test_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vlm: x\nlr: 0.001\n")
    config = load_config(Stage1Config, path, ["max_steps=7", "families=[lesion]", "resume=true"])
    assert config.max_steps == 7 and config.families == ["lesion"] and config.resume is True and config.lr == 0.001
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(Stage1Config, path, ["max_steps=seven"])


def test_hub_id_fails_at_once_with_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not a local folder"):
        load_vlm("Qwen/Qwen3-VL-8B-Instruct")
    assert time.perf_counter() - start < 5


def test_tiny_model_loads_through_the_production_path(tiny_env):
    model, processor = load_vlm(tiny_env.vlm)
    assert isinstance(processor, ImageOnlyQwen3VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<|latent|>") < model.config.text_config.vocab_size


def test_encoder_interface_shapes_and_region(tiny_env):
    from PIL import Image

    encoder = load_encoder(tiny_env.encoder)
    assert isinstance(encoder, TinySegEncoder)
    images = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(3)]
    out = encoder.encode(images)
    assert out.tokens.shape == (3, 64, encoder.feature_dim)
    assert out.grid == (8, 8)
    assert out.region_mask.shape == (3, 64) and out.region_mask.dtype == torch.bool
    assert out.region_mask.any(dim=1).all()  # never empty


def test_top_region_threshold_and_fallback():
    conf = torch.tensor([[0.1, 0.9, 0.7, 0.2], [0.1, 0.3, 0.2, 0.05]])
    region = top_region(conf, 0.5)
    assert region.tolist() == [[False, True, True, False], [False, True, False, False]]


def test_unknown_encoder_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"encoder": "mystery"}')
    with pytest.raises(ValueError, match="mystery"):
        load_encoder(tmp_path)
