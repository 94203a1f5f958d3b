"""Rollouts from a vLLM engine for the recipes that sample (Stage II's G per prompt, Stage III's one per sample):
shared by both, so that neither recipe imports the other.

Plan: `start_engine` starts one engine over the training model (exported with its LoRA merged, in one process);
`rollouts_from_engine` sends each prompt's images, question and system message as the dataset encodes them with the
trainer's own memory row, and returns the tokens padded with the end token and masked as transformers' `generate`
path pads and masks them, with vLLM's per-token log-probabilities; `engine_logprob_gap` says whether the engine
sampled the model the loss is computed on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medsynapse.data.dataset import VQADataset
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import completion_mask


@dataclass
class Rollouts:
    """Sampled continuations, from transformers' `generate` or from the engine."""

    tokens: torch.Tensor  # (rows, T), padded with the end token
    mask: torch.Tensor  # (rows, T): up to and including the end token
    texts: list[str]
    seconds: float
    engine_logprobs: torch.Tensor | None = None  # (rows, T) the engine's own log π(o_t) at T = 1, 0 where masked


def start_engine(engine: str, model: MedSynapseV, seed: int, output: Path, processes: int):
    """None for `hf` (transformers' generate); for `vllm` one engine over the model (exported to OUTPUT/.vllm) next
    to one trainer process."""
    if engine == "hf":
        return None
    if processes > 1:
        raise ValueError(f"engine: vllm runs one engine next to one trainer process; this run has {processes} "
                         "(use engine: hf with several processes)")
    from medsynapse.engines.vllm_engine import VLLMEngine  # .venv-vllm only (engines.check_engine said so first)

    # every request has its own seed; vLLM 0.32 on the CPU cannot rewind a seeded request's generator when a step
    # discards its token (a prefill split over steps: "CPU Generator does not use offset"), so a step's prefills must
    # fit one batch: 64 K tokens instead of the CPU default 4,096 (the demo's 16 prompts x G 4 need ~5,000)
    return VLLMEngine(model, output / ".vllm", max_images=model.max_images or 1, seed=seed, max_model_len=4096,
                      max_num_batched_tokens=65536)


def rollouts_from_engine(engine, model: MedSynapseV, dataset: VQADataset, indices: list[int],
                         memory: torch.Tensor | None, per_prompt: int, max_new_tokens: int, temperature: float,
                         top_p: float, keys: torch.Tensor) -> Rollouts:
    """`per_prompt` draws for each dataset index (rows in prompt order), prompt i with memory row `memory[i]` (None:
    a model without memory) and seed `keys[i]`."""
    start = time.perf_counter()
    samples = [dataset.samples[i] for i in indices]
    memories = [None if memory is None else memory[i].to(engine.dtype) for i in range(len(indices))]
    outputs = engine.generate([dataset.images(i) for i in indices], [s.model_prompt for s in samples],
                              max_new_tokens, n=per_prompt, temperature=temperature, top_p=top_p,
                              seed=[int(key) % 2**62 for key in keys.tolist()], logprobs=True, memories=memories,
                              systems=[s.system for s in samples])
    completions = [completion for request in outputs for completion in request]
    eos = model.prompts.eos_id
    width = max(1, *(len(c.token_ids) for c in completions))
    tokens = torch.full((len(completions), width), eos, dtype=torch.long)
    logprobs = torch.zeros(len(completions), width)
    for row, completion in enumerate(completions):
        tokens[row, :len(completion.token_ids)] = torch.tensor(completion.token_ids, dtype=torch.long)
        logprobs[row, :len(completion.token_ids)] = torch.tensor(completion.logprobs or [])
    mask = completion_mask(tokens, eos)
    texts = model.processor.tokenizer.batch_decode(tokens * mask + (1 - mask) * eos, skip_special_tokens=True)
    return Rollouts(tokens, mask, texts, time.perf_counter() - start, logprobs * mask)


def engine_logprob_gap(engine_logprobs: torch.Tensor, model_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest |engine − model| per-token log-prob (T = 1) over the generated tokens: ~1e-6 when the engine
    sampled the model the loss is computed on (float32), large when its weights or memory are not that model's."""
    return float(((engine_logprobs - model_logprobs) * mask).abs().max())
