"""The on-disk prior-feature cache: same features as computing, keyed by encoder config and image content."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from medsynapse.cli import main
from medsynapse.data.dataset import VQADataset
from medsynapse.data.schema import read_samples
from medsynapse.model.encoders import cache as cache_module
from medsynapse.model.encoders import load_encoder
from medsynapse.model.encoders.cache import PriorCache, encoder_fingerprint
from medsynapse.recipes.priors import prior_table


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
    assert computed.finding is not None and torch.equal(cached.finding, computed.finding)


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


def test_recipe_reads_the_cache(tiny_env, tmp_path, monkeypatch):
    from medsynapse.model.encoders.base import PriorEncoder
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1

    cache = tmp_path / "cache"
    _fill(tiny_env.encoder, tiny_env.train_file, cache)

    def never(self, images):
        raise AssertionError("the recipe encoded an image the cache holds")

    monkeypatch.setattr(PriorEncoder, "encode", never)  # every encoder, whatever its class
    out = train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder),
                                    train_file=str(tiny_env.train_file), output_dir=str(tmp_path / "s1"), n_memory=4,
                                    sampler_width=32, batch_size=4, max_steps=1, prior_cache=str(cache)))
    assert (out / "sampler.safetensors").is_file()


def _weights_folder(tmp_path, name, middle_value):
    """An encoder-like folder whose weight file is 4 MB, differing from its siblings only in the middle."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "test"}))
    weights = torch.zeros(1_000_000)
    weights[500_000] = middle_value
    save_file({"w": weights}, str(folder / "model.safetensors"))
    return folder


def test_same_size_retrained_weights_change_the_fingerprint(tmp_path):
    a = _weights_folder(tmp_path, "a", 0.0)
    b = _weights_folder(tmp_path, "b", 1.0)  # same size, same first and last MiB
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size > 3 * 2**20
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    assert encoder_fingerprint(a) == encoder_fingerprint(_weights_folder(tmp_path, "a_copy", 0.0))


def test_weight_digests_are_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    folder = _weights_folder(tmp_path, "enc", 0.0)
    monkeypatch.setattr(cache_module, "_DIGESTS", {})
    PriorCache(tmp_path / "cache", folder)  # hashes once, remembers in the process and on disk
    assert len(json.loads((tmp_path / "cache" / "file_digests.json").read_text())) == 1

    def no_rehash(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(cache_module, "_hash_file", no_rehash)
    fingerprint = encoder_fingerprint(folder)  # the process's memo
    monkeypatch.setattr(cache_module, "_DIGESTS", {})  # a new process: the file in the cache root serves
    assert PriorCache(tmp_path / "cache", folder).dir.name == fingerprint
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000))  # rewritten: must be hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        encoder_fingerprint(folder)


def test_a_cache_of_the_layout_without_finding_flags_is_recomputed(tiny_env, tmp_path):
    """Layout 1 (`index.json`, no finding flag per image) is ignored: read, it would give a table without findings and
    no reference bank."""
    cache = tmp_path / "cache"
    _fill(tiny_env.encoder, tiny_env.train_file, cache)
    folder = PriorCache(cache, tiny_env.encoder).dir
    (folder / cache_module.INDEX).rename(folder / "index.json")
    dataset = VQADataset(read_samples(tiny_env.train_file), prompts=None)
    encoder = load_encoder(tiny_env.encoder)
    calls = []

    def encode(images):
        calls.append(len(images))
        return encoder.encode(images)

    table, _ = prior_table(encode, str(tiny_env.encoder), dataset, cache_dir=str(cache))
    assert sum(calls) == table.tokens.shape[0] and table.finding is not None
