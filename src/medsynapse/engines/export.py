"""One of our model folders as a folder vLLM loads: the VLM with its LoRA merged, a stock processor, a spare row.

Plan (each step one function; shared/reference/vllm-cpu.md says why each is needed):
  - the VLM: `MedSynapseV.from_pretrained(..., merge_adapter=True)` folds the Stage II LoRA into the weights, and the
    bare Qwen3-VL (no peft wrapper) is saved with `save_pretrained`;
  - the vocabulary: vLLM marks prompt-embeds positions with a token it adds to the tokenizer (id = len(tokenizer)),
    so the embedding and `lm_head` need a row for it. When they have none, they are padded with zero rows to the
    next multiple of 64, and the number of real rows is recorded in config.json (`medsynapse_vocab_rows`) so the
    plugin (engines/vllm_plugin.py) gives the padded rows -inf logits: greedy tokens and log-probabilities then
    equal the unpadded model's. Qwen3-VL-8B (151,936 rows for ~151,670 tokens) has room and is left as it is;
  - the processor: saved as the stock `Qwen3VLProcessor` (processor_config.json and tokenizer_config.json name it;
    our folders name the image-only subclass, which vLLM cannot resolve) with a `video_preprocessor_config.json`
    (vLLM builds the video processor even when videos are disabled).
The memory modules (P_phi, A_psi, the prior encoder) stay in MedSynapseV on the transformers side: vLLM only receives
their output vectors. Nothing here imports vLLM, so this runs (and is tested) in the main environment too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch

from medsynapse.locking import make_tree_readable
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import core_vlm

VOCAB_ROWS_KEY = "medsynapse_vocab_rows"  # config.json: rows of the model before padding (the plugin masks the rest)
PROCESSOR_CLASS = "Qwen3VLProcessor"
ROW_MULTIPLE = 64


def spare_rows_needed(rows: int, tokenizer_len: int) -> int:
    """Embedding rows the exported model needs: its own when they leave a row for vLLM's placeholder token (whose
    id is `tokenizer_len`), else `tokenizer_len + 1` rounded up to a multiple of 64."""
    if rows > tokenizer_len:
        return rows
    return -(-(tokenizer_len + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (V, H) with zero rows appended up to `rows`."""
    extra = weight.new_zeros(rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight.detach(), extra])


def vocabulary_keys(vlm) -> list[str]:
    """State-dict names of the input embedding and lm_head weights (one name when they are tied)."""
    wanted = {id(vlm.get_input_embeddings().weight), id(vlm.get_output_embeddings().weight)}
    return [name for name, tensor in vlm.state_dict(keep_vars=True).items() if id(tensor) in wanted]


def padded_state(vlm, tokenizer_len: int) -> tuple[dict[str, torch.Tensor], int]:
    """The VLM's state dict with the embedding and lm_head given a spare row for vLLM's placeholder (the model itself
    is not changed), and their row count in it."""
    state = vlm.state_dict()
    target = spare_rows_needed(vlm.get_input_embeddings().num_embeddings, tokenizer_len)
    for key in vocabulary_keys(vlm):
        state[key] = pad_rows(state[key], target)
    return state, target


def video_processor_config(image_processor) -> dict:
    """A `video_preprocessor_config.json` matching the image processor's patching (videos stay disabled)."""
    return {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": PROCESSOR_CLASS,
            "patch_size": image_processor.patch_size, "temporal_patch_size": image_processor.temporal_patch_size,
            "merge_size": image_processor.merge_size, "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std), "do_sample_frames": False}


def name_stock_processor(folder: Path) -> None:
    """processor_config.json and tokenizer_config.json name `Qwen3VLProcessor`; add the video processor config."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config["processor_class"] = PROCESSOR_CLASS
            path.write_text(json.dumps(config, indent=2))


def save_processor(processor, folder: Path) -> None:
    processor.save_pretrained(folder)
    name_stock_processor(folder)
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps(video_processor_config(processor.image_processor), indent=2))


def record_vocab_rows(folder: Path, rows: int, target: int) -> None:
    """config.json with the padded vocabulary size `target` and the real `rows` as `medsynapse_vocab_rows` (both left
    as they are when nothing was padded)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop(VOCAB_ROWS_KEY, None)
    if target != rows:
        config[VOCAB_ROWS_KEY] = rows
        config["text_config"]["vocab_size"] = target
        if "vocab_size" in config:
            config["vocab_size"] = target
    path.write_text(json.dumps(config, indent=2))


def merged_vlm(model: MedSynapseV):
    """The bare Qwen3-VL of a loaded model: itself when it has no LoRA (a folder loaded with `merge_adapter`), else a
    copy with the LoRA folded into its weights (the loaded model keeps its adapter; this costs a second copy)."""
    import copy

    if hasattr(model.vlm, "merge_and_unload"):
        return copy.deepcopy(model.vlm).merge_and_unload()
    return core_vlm(model.vlm)


def export_for_vllm(model: MedSynapseV | str | Path, out_dir: str | Path) -> Path:
    """Write `model` (a loaded MedSynapseV, or one of our folders: loaded with its LoRA merged) as a folder vLLM loads.
    The loaded model is not changed. Returns `out_dir`."""
    if not isinstance(model, MedSynapseV):
        model = MedSynapseV.from_pretrained(model, merge_adapter=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vlm = merged_vlm(model)
    state, target = padded_state(vlm, len(model.processor.tokenizer))
    vlm.save_pretrained(out, state_dict=state)
    save_processor(model.processor, out)
    record_vocab_rows(out, vlm.get_input_embeddings().num_embeddings, target)
    make_tree_readable(out)
    return out


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM loads each group into one fused matrix


def lora_merged_weights(vlm) -> list[tuple[str, torch.Tensor]]:
    """The weights a training LoRA changes, merged as peft's merge computes them (W + ΔW of the active adapters, each
    ΔW from `get_delta_weight`), with their fused siblings (q/k/v, gate/up: vLLM rebuilds a fused matrix only from
    all its parts), under the plain Qwen3-VL checkpoint's names (`model.language_model.layers.0.self_attn.q_proj.
    weight`): what an export would write for those modules, for a running vLLM to load in place after each optimiser
    step. Empty for a VLM without LoRA."""
    from peft.tuners.lora import Linear as LoraLinear

    prefix = "base_model.model."
    modules = dict(vlm.named_modules())
    names: list[str] = []
    for name, module in modules.items():
        if isinstance(module, LoraLinear):
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in FUSED if leaf in g), (leaf,))
            names += [f"{parent}.{part}" for part in group if f"{parent}.{part}" in modules]
    weights = []
    for name in dict.fromkeys(names):  # in order, once
        module = modules[name]
        if isinstance(module, LoraLinear):  # the LoRA layers on linear projections (the only kind add_lora makes)
            weight = cast(torch.Tensor, module.get_base_layer().weight).detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach()
        else:
            weight = cast(torch.Tensor, module.weight).detach()
        weights.append((f"{name.removeprefix(prefix)}.weight", weight))
    return weights
