"""Generation engines other than transformers' `generate` (the model package knows nothing of them).

`export`: one of our model folders (LoRA merged) as a folder vLLM loads; plain transformers/torch, no vLLM import.
`vllm_plugin`: the `vllm.general_plugins` entry point, registering a Qwen3-VL that accepts memory rows.
`vllm_engine`: MedSynapseV's memory (P_phi or A_psi, computed here with transformers) injected after the question
into vLLM's generation through its prompt-embeds chat route. Both import vLLM: they need the `.venv-vllm` environment
(`make vllm-env`).
"""
