"""Generation engines other than transformers' `generate` (the model package knows nothing of them).

`export`: one of our model folders (LoRA merged) as a folder vLLM loads; plain transformers/torch, no vLLM import.
`vllm_plugin`: the `vllm.general_plugins` entry point, registering a Qwen3-VL that accepts memory rows.
`vllm_engine`: MedSynapseV's memory (P_phi or A_psi, computed here with transformers) injected after the question
into vLLM's generation through its prompt-embeds chat route. Both import vLLM: they need the `.venv-vllm` environment
(`make vllm-env`).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

Engine = Literal["hf", "vllm"]
ENGINES = ("hf", "vllm")


def check_engine(engine: str) -> None:
    """A known engine, and for `vllm` an importable vLLM (the .venv-vllm environment): refused before anything is
    loaded or written."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("engine vllm needs vLLM, which is not importable in this environment: run with the "
                         ".venv-vllm environment (make vllm-env; docs/vllm.md)")
