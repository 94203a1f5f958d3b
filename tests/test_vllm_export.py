"""The vLLM export (engines/export.py) in the main environment: no vLLM needed, so these run in `make test`.

A folder vLLM can load is our VLM with the LoRA merged, a stock-named processor with a video processor config, and
a spare vocabulary row whose padding is recorded for the plugin's logit mask. Checked by value here; that vLLM
loads it and generates what transformers generates is tests/test_vllm.py's (`.venv-vllm`).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import lora_teacher

from medsynapse.engines.export import VOCAB_ROWS_KEY, export_for_vllm, spare_rows_needed
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import core_vlm


@pytest.mark.parametrize(("rows", "tokenizer_len", "expected"), [
    (462, 462, 512),  # the tiny model: no room for vLLM's placeholder id 462 → next multiple of 64 past it
    (512, 512, 576),  # a full multiple still needs a row
    (463, 462, 463),  # room already
    (151936, 151670, 151936),  # Qwen3-VL-8B: left as it is
])
def test_spare_rows_by_value(rows, tokenizer_len, expected):
    assert spare_rows_needed(rows, tokenizer_len) == expected


@pytest.fixture(scope="module")
def lora_folder(tiny_env, tmp_path_factory):
    return lora_teacher(tiny_env, tmp_path_factory.mktemp("lora_teacher"))


def test_export_merges_the_lora_and_pads_one_spare_row(lora_folder, tmp_path):
    merged = MedSynapseV.from_pretrained(lora_folder, merge_adapter=True)
    base = MedSynapseV.from_pretrained(lora_folder)  # the adapter as trained, not merged
    out = export_for_vllm(lora_folder, tmp_path / "vllm")
    exported = MedSynapseV.from_pretrained(out)  # a plain Qwen3-VL folder for our loader too
    tokenizer_len = len(merged.processor.tokenizer)
    config = json.loads((out / "config.json").read_text())
    rows = core_vlm(merged.vlm).get_input_embeddings().num_embeddings
    assert config[VOCAB_ROWS_KEY] == rows == tokenizer_len
    assert config["text_config"]["vocab_size"] == spare_rows_needed(rows, tokenizer_len) > tokenizer_len
    state, want = core_vlm(exported.vlm).state_dict(), core_vlm(merged.vlm).state_dict()
    for key, value in want.items():
        got = state[key]
        if got.shape != value.shape:  # the embedding and lm_head: real rows kept, padding zero
            assert torch.equal(got[:rows], value) and not got[rows:].any(), key
        else:
            assert torch.equal(got, value), key
    q_key = "model.language_model.layers.0.self_attn.q_proj.weight"
    unmerged = core_vlm(base.vlm).state_dict()[q_key.replace("q_proj.weight", "q_proj.base_layer.weight")]
    assert not torch.allclose(state[q_key], unmerged)  # the LoRA's update is in the exported weights


def test_export_names_the_stock_processor_and_leaves_the_model_unchanged(tiny_env, tmp_path):
    model = MedSynapseV.from_pretrained(tiny_env.vlm)
    before = {k: v.clone() for k, v in core_vlm(model.vlm).state_dict().items()}
    out = export_for_vllm(model, tmp_path / "vllm")
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((out / name).read_text())["processor_class"] == "Qwen3VLProcessor"
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert (video["patch_size"], video["merge_size"]) == (16, 2)
    after = core_vlm(model.vlm).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # padding went to the file, not the model


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is importable here (.venv-vllm)")
def test_eval_engine_vllm_is_refused_without_vllm_before_writing(tiny_env, tmp_path):
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks

    with pytest.raises(ValueError, match="not importable in this environment"):
        evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad"], tmp_path / "data", tmp_path / "out",
                            EvalSettings(engine="vllm"))
    with pytest.raises(ValueError, match="is not one of"):
        evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad"], tmp_path / "data", tmp_path / "out",
                            EvalSettings(engine="tgi"))
    assert not (tmp_path / "out").exists()


def test_a_loaded_model_with_its_adapter_is_exported_merged_and_keeps_its_adapter(lora_folder, tmp_path):
    merged = MedSynapseV.from_pretrained(lora_folder, merge_adapter=True)
    trained = MedSynapseV.from_pretrained(lora_folder)  # the adapter as trained, not merged
    lora_before = {k: v.clone() for k, v in trained.vlm.state_dict().items() if "lora_" in k}
    assert lora_before
    out = export_for_vllm(trained, tmp_path / "vllm")
    state, want = core_vlm(MedSynapseV.from_pretrained(out).vlm).state_dict(), core_vlm(merged.vlm).state_dict()
    assert state.keys() == want.keys()  # no LoRA or base_layer names: the plain Qwen3-VL layout
    rows = core_vlm(merged.vlm).get_input_embeddings().num_embeddings
    for key, value in want.items():
        assert torch.equal(state[key][:rows] if state[key].shape != value.shape else state[key], value), key
    after = trained.vlm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in lora_before.items())  # the loaded model keeps its adapter


def test_the_weights_sent_to_a_running_engine_are_the_merged_exports_with_their_fused_siblings(lora_folder):
    from medsynapse.engines.export import lora_merged_weights, merged_vlm

    trained = MedSynapseV.from_pretrained(lora_folder)  # the adapter as trained, not merged
    sent = lora_merged_weights(trained.vlm)
    names = [name for name, _ in sent]
    layers = core_vlm(trained.vlm).config.text_config.num_hidden_layers
    assert names == [f"model.language_model.layers.{i}.self_attn.{p}_proj.weight" for i in range(layers)
                     for p in "qkv"]  # k has no LoRA: sent because vLLM fuses q, k and v into one matrix
    export = merged_vlm(trained).state_dict()
    assert all(torch.equal(tensor, export[name]) for name, tensor in sent)  # bit for bit what an export writes
    plain = MedSynapseV.from_pretrained(lora_folder, merge_adapter=True)
    assert lora_merged_weights(plain.vlm) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is importable here (.venv-vllm)")
def test_stage2_engine_vllm_is_refused_without_vllm_before_writing(tiny_env, tmp_path):
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

    config = Stage2Config(model=str(tiny_env.vlm), train_file=str(tiny_env.train_file),
                          output_dir=str(tmp_path / "s2"), engine="vllm")
    with pytest.raises(ValueError, match="engine vllm needs vLLM, which is not importable"):
        train_stage2(config)
    assert not (tmp_path / "s2").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is importable here (.venv-vllm)")
def test_serve_engine_vllm_is_refused_without_vllm_in_one_line(tiny_env, capsys):
    from medsynapse.cli import main

    assert main(["serve", "--model", str(tiny_env.vlm), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medsynapse serve: error: engine vllm needs vLLM"), err
