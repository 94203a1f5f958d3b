"""An exported folder (`medsynapse export`, model/export.py): an encoder-free student that needs nothing outside it.

What it holds, and who reads what:
- `model.safetensors` (or shards and their index): the VLM with the Stage II LoRA merged into its weights, and A_psi
  under the prefix `memory.`;
- `config.json`: Qwen3-VL's config with `model_type` `medsynapse_qwen3_vl`, `architectures`, `auto_map` naming the
  shipped modeling file, and `medsynapse` (A_psi's config, the memory-slot token, the tokens never generated);
- `modeling_medsynapse.py` (model/exported_modeling.py, copied): what `AutoModelForImageTextToText` /
  `AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)` run; it imports only torch and transformers;
- the processor (`processor_config.json`, naming the shipped image-only processor in its `auto_map`), the tokenizer,
  the chat template and `generation_config.json`;
- `medsynapse.json` (manifest format 3): what `MedSynapseV.from_pretrained` reads; the VLM is the folder itself, so
  no base is searched for ($MEDSYNAPSE_CACHE is never read);
- `README.md`: the model card, with Hub front matter.

This module is the reading side MedSynapse needs (the names above and the loaders); model/export.py writes. MedSynapse
loads the folder with its own classes (the stock Qwen3-VL and the image-only processor), never the shipped code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from medsynapse.model.processor import ImageOnlyQwen3VLProcessor, ModelNotFoundError, load_processor

BUNDLED_FORMAT = 3  # manifest format of an exported folder
MODEL_TYPE = "medsynapse_qwen3_vl"
MODELING_FILE = "modeling_medsynapse.py"
MODELING_MODULE = MODELING_FILE.removesuffix(".py")
MEMORY_PREFIX = "memory."  # A_psi's tensors in the folder's weights
HF_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "medsynapse")  # what export adds to Qwen3-VL's config
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


class BundledQwen3VL(Qwen3VLForConditionalGeneration):
    """The stock Qwen3-VL, loaded from an exported folder: its A_psi tensors (`memory.*`) are read apart
    (`memory_state`), not reported as unexpected weights."""

    _keys_to_ignore_on_load_unexpected = [r"^memory\."]


def is_bundled(manifest: dict) -> bool:
    return manifest.get("format") == BUNDLED_FORMAT


def qwen3vl_config(folder: Path) -> Qwen3VLConfig:
    """The folder's config.json as the stock Qwen3-VL config (export's own keys left out)."""
    raw = json.loads((folder / "config.json").read_text())
    return Qwen3VLConfig.from_dict({key: value for key, value in raw.items() if key not in HF_CONFIG_KEYS})


def load_bundled_vlm(folder: Path, dtype: torch.dtype | str = "auto"
                     ) -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """The merged VLM and the processor of an exported folder (no trust_remote_code: MedSynapse's own classes)."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder / 'config.json'}: missing (the exported folder is incomplete)")
    config = qwen3vl_config(folder)
    processor = load_processor(folder, config=config)
    vlm = BundledQwen3VL.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True)
    vlm.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return vlm, processor


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the shards its index names, or the one weights file."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / WEIGHTS]


def memory_state(folder: Path) -> dict[str, torch.Tensor]:
    """A_psi's tensors (the `memory.` prefix removed), read from the folder's weights without the VLM's."""
    state = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: missing (the exported folder is incomplete)")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(MEMORY_PREFIX):
                    state[key.removeprefix(MEMORY_PREFIX)] = handle.get_tensor(key)
    if not state:
        raise ModelNotFoundError(f"{folder}: its weights hold no A_psi tensors ({MEMORY_PREFIX}*); the exported "
                                 "folder is incomplete")
    return state
