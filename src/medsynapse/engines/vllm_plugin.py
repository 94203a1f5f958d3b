"""The `vllm.general_plugins` entry point (pyproject.toml): registers MedSynapse's Qwen3-VL with vLLM's registry.

vLLM calls `register` in every process it starts (the engine core, workers). The class is registered as a class, not
by its import path: vLLM inspects a lazily registered class in a fresh Python process (a full vLLM import, minutes on
a loaded 2-core machine). `VLLMEngine` selects it with `hf_overrides={"architectures": [ARCHITECTURE]}`, so an
exported folder stays a stock Qwen3-VL folder.
"""

from __future__ import annotations

ARCHITECTURE = "MedSynapseQwen3VLForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        from medsynapse.engines.vllm_model import MedSynapseQwen3VL

        ModelRegistry.register_model(ARCHITECTURE, MedSynapseQwen3VL)
