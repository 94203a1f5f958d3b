"""The on-disk prior-feature cache: same features as computing, keyed by encoder config and image content."""

from __future__ import annotations

import json
import shutil

import torch

from medsynapse.cli import main
from medsynapse.data.dataset import VQADataset
from medsynapse.data.schema import read_samples
from medsynapse.model.encoders import load_encoder
from medsynapse.model.encoders.cache import encoder_fingerprint
from medsynapse.recipes.stage1_warmup import prior_table


def _fill(encoder, data, cache):
    assert main(["cache-features", "--encoder", str(encoder), "--data", str(data), "--out", str(cache)]) == 0


def test_cache_features_cli_then_read_equals_computing(tiny_env, tmp_path):
    cache = tmp_path / "cache"
    assert main(["cache-features", "--encoder", str(tiny_env.encoder), "--data", str(tiny_env.train_file),
                 "--out", str(cache)]) == 0
    encoder = load_encoder(tiny_env.encoder)
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    computed, rows = prior_table(encoder.encode, None, dataset)

    def never(images):
        raise AssertionError("a cached image must not be re-encoded")

    cached, cached_rows = prior_table(never, str(tiny_env.encoder), dataset, cache_dir=str(cache))
    assert rows == cached_rows and computed.grid == cached.grid
    torch.testing.assert_close(cached.tokens, computed.tokens, atol=1e-6, rtol=1e-6)
    assert torch.equal(cached.region_mask, computed.region_mask)


def test_changed_encoder_config_never_reads_stale_features(tiny_env, tmp_path):
    cache = tmp_path / "cache"
    _fill(tiny_env.encoder, tiny_env.train_file, cache)
    changed = tmp_path / "encoder_changed"
    shutil.copytree(tiny_env.encoder, changed)
    config = json.loads((changed / "config.json").read_text())
    config["threshold"] = 0.9  # a different region mask
    (changed / "config.json").write_text(json.dumps(config))
    assert encoder_fingerprint(changed) != encoder_fingerprint(tiny_env.encoder)
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    calls = []
    encoder = load_encoder(changed)

    def encode(images):
        calls.append(len(images))
        return encoder.encode(images)

    prior_table(encode, str(changed), dataset, cache_dir=str(cache))
    assert sum(calls) == len({s.images[0] for s in dataset.samples})  # every image recomputed for the new config


def test_edited_image_misses_the_cache(tiny_env, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(tiny_env.train_file.parent, data)
    cache = tmp_path / "cache"
    _fill(tiny_env.encoder, data / "train.jsonl", cache)
    victim = read_samples(data / "train.jsonl")[0].images[0]
    Image.new("RGB", (64, 64), (255, 0, 0)).save(victim)
    encoder = load_encoder(tiny_env.encoder)
    calls = []

    def encode(images):
        calls.append(len(images))
        return encoder.encode(images)

    prior_table(encode, str(tiny_env.encoder), VQADataset(read_samples(data / "train.jsonl"), prompts=None),
                cache_dir=str(cache))
    assert calls == [1]


def test_recipe_reads_the_cache(tiny_env, tmp_path):
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1

    cache = tmp_path / "cache"
    _fill(tiny_env.encoder, tiny_env.train_file, cache)
    out = train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder),
                                    train_file=str(tiny_env.train_file), output_dir=str(tmp_path / "s1"), n_memory=4,
                                    sampler_width=32, batch_size=4, max_steps=1, prior_cache=str(cache)))
    assert (out / "sampler.safetensors").is_file()
