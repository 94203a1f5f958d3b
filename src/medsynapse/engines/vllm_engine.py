"""Generation through vLLM with MedSynapse-V's memory injected after the question (needs `.venv-vllm`).

Plan:
  - the memory is computed on the transformers side, by the loaded `MedSynapseV` itself (`memory_for`: P_phi over
    the prior encoder's tokens for a teacher, A_psi over the VLM's visual tokens for the encoder-free student), so
    it is the very tensor the transformers path would splice in;
  - the VLM runs in vLLM, loaded from an exported folder (engines/export.py: LoRA merged, stock processor, spare
    vocabulary row) with the plugin's class (engines/vllm_model.py);
  - each question is one chat: the user turn holds the images and the question, and the assistant turn holds a
    single `prompt_embeds` content part with the memory (N, hidden). With `continue_final_message` the prompt ends
    `<|im_start|>assistant\\n` + N memory rows, exactly where `PromptBuilder` puts its N `<|latent|>` slots; memory
    rows get text positions there, as in transformers. A model without memory gets the plain generation prompt;
  - sampling mirrors `generate_with_memory`: greedy by default, the model's suppressed structural tokens never
    emitted (`bad_words`), its generation config's end tokens stop, nothing else from that config applies
    (`generation_config="vllm"`). Log-probabilities are vLLM's raw ones: log-softmax of the unprocessed logits, as
    `completion_logprobs` computes them;
  - training (Stage II's rollouts): the trainer's LoRA-changed weights, merged, are loaded into the running engine
    before each step's rollouts (`sync_weights`, through a worker extension as TRL's colocate mode does), the
    memory is the trainer's own tensor, and the loss's log-probabilities still come from the training model;
  - prefix caching is off: memory spans are all one placeholder token id whatever their values. vLLM 0.32 does hash
    prompt-embeds values into its block hashes (v1/core/kv_cache_utils.py), but our prompts are shorter than a cache
    block, so no test here could show it keeps two memories apart; the G continuations of a prompt share its
    prefill anyway (`n=G`).
"""

from __future__ import annotations

import base64
import copy
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medsynapse.engines.export import export_for_vllm, lora_merged_weights
from medsynapse.engines.vllm_plugin import ARCHITECTURE
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import PromptBatch, core_vlm, vision_features

WORKER_EXTENSION = "medsynapse.engines.vllm_worker.WeightSync"


@dataclass
class Completion:
    """One generated continuation: its token ids (up to and including the end token when it stopped), the text
    (decoded by our tokenizer, special tokens skipped, stripped) and, when asked, each token's log-probability."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None  # per token: (token id, log-prob) likeliest first, as vLLM
    # returned them (with `top_logprobs=k`: the k likeliest, then the chosen one when it is not among them)


def embeds_part(memory: torch.Tensor) -> dict:
    """A chat content part carrying `memory` (N, H) as vLLM's prompt-embeds route reads it (base64 torch.save)."""
    buffer = io.BytesIO()
    torch.save(memory.detach().cpu().contiguous(), buffer)
    return {"type": "prompt_embeds", "data": base64.b64encode(buffer.getvalue()).decode()}


def chat_messages(images: Sequence[Image.Image], question: str, memory: torch.Tensor | None,
                  system: str = "") -> list[dict]:
    """The chat `PromptBuilder.prompt_text` renders: [system], user (images, then the question), and for a model with
    memory an assistant turn holding only the memory, to be continued."""
    content = [{"type": "image_pil", "image_pil": image} for image in images] + [{"type": "text", "text": question}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    if memory is not None:
        messages.append({"role": "assistant", "content": [embeds_part(memory)]})
    return messages


def end_token_ids(model: MedSynapseV) -> list[int]:
    """The tokens that end a generation in transformers: the generation config's eos ids, else `<|im_end|>`."""
    eos = core_vlm(model.vlm).generation_config.eos_token_id
    if eos is None:
        return [model.prompts.eos_id]
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def banned_words(model: MedSynapseV) -> list[str]:
    """The structural tokens transformers suppresses (`suppressed_ids`), as vLLM's `bad_words`: each is one token, so
    vLLM gives it -inf at every step (exact, and per request a few entries, where `allowed_token_ids` would copy and
    mask a whole vocabulary list: 151,936 ids at 8B)."""
    return model.processor.tokenizer.convert_ids_to_tokens(model.prompts.suppressed_ids)


def counts_batch(counts: list[int]) -> PromptBatch:
    """A prompt batch holding only each question's image count: all `memory_for` reads for P_phi's memory (the prior
    encoder sees the images themselves), so a teacher's prompts are not processed twice (vLLM processes its own)."""
    empty = torch.zeros(len(counts), 0, dtype=torch.long)
    return PromptBatch(empty, empty, empty, torch.zeros(0), torch.zeros(0, 3, dtype=torch.long), None, counts)


def token_logprobs(step_logprobs, token_ids: list[int]) -> list[float]:
    """The log-probability of each chosen token from vLLM's per-step {token id: Logprob} dicts."""
    return [float(step[token].logprob) for step, token in zip(step_logprobs, token_ids)]


def engine_environment(in_process: bool | None, kv_cache_gib: int) -> None:
    """vLLM's environment switches, set before the engine starts: KV-cache size on CPU (unless set), and whether the
    engine core runs in this process (quick to start, but vLLM then sets torch to one thread) or its own (vLLM's
    default; None leaves VLLM_ENABLE_V1_MULTIPROCESSING as the environment has it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if in_process is not None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"


class VLLMEngine:
    """A loaded MedSynapseV (memory, prompts, tokenizer) with its VLM served by vLLM."""

    def __init__(self, model: MedSynapseV, export_dir: str | Path, *, max_images: int = 1, max_model_len: int = 2048,
                 kv_cache_gib: int = 1, in_process: bool | None = None, seed: int = 0, **llm_kwargs):
        from vllm import LLM

        self.model = model.eval()
        self.folder = export_for_vllm(model, export_dir)
        engine_environment(in_process, kv_cache_gib)
        dtype = llm_kwargs.pop("dtype", next(core_vlm(model.vlm).parameters()).dtype)  # vLLM's CPU "auto": bf16
        llm_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        self.llm = LLM(model=str(self.folder), dtype=dtype, max_model_len=max_model_len,
                       enforce_eager=True, enable_prompt_embeds=True, enable_prefix_caching=False,
                       limit_mm_per_prompt={"image": max_images, "video": 0},
                       hf_overrides={"architectures": [ARCHITECTURE]}, generation_config="vllm", seed=seed,
                       **llm_kwargs)
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.banned, self.stop_ids = banned_words(model), end_token_ids(model)

    def with_model(self, model: MedSynapseV) -> VLLMEngine:
        """An engine over this one's vLLM instance for another MedSynapseV whose VLM has the same weights (a teacher,
        the student built on its VLM, the plain VLM): vLLM only sees the VLM, the memory comes from `model`. The
        weights are the caller's promise, not checked."""
        engine = copy.copy(self)
        engine.model = model.eval()
        engine.banned, engine.stop_ids = banned_words(model), end_token_ids(model)
        return engine

    @classmethod
    def from_pretrained(cls, folder: str | Path, export_dir: str | Path, **kwargs) -> VLLMEngine:
        """One of our model folders (or a plain Qwen3-VL folder), its LoRA merged."""
        return cls(MedSynapseV.from_pretrained(folder, merge_adapter=True), export_dir, **kwargs)

    @torch.no_grad()
    def memories(self, images: Sequence[Sequence[Image.Image]], questions: Sequence[str], branch: str | None = None,
                 intervention: str = "zero") -> list[torch.Tensor | None]:
        """Each question's memory (N, H) as `MedSynapseV.generate_encoded` computes it (one batch), None per
        question for a model without memory; a latent-reasoning baseline is refused."""
        model = self.model
        if model.latent is not None:
            raise ValueError(f"a latent-reasoning baseline ({model.latent['method']}) computes its thoughts with the "
                             "VLM's own forward hooks (model/latent.py), which need transformers 5.24 (its tests fail "
                             "under the vLLM environment's 5.19): not served through vLLM")
        if model.n_memory == 0:
            return [None] * len(questions)
        features = None
        if model.autonomous is None:  # P_phi: the prior encoder's tokens, no prompt
            batch = counts_batch([len(imgs) for imgs in images])
        else:  # A_psi reads the VLM's merged visual tokens
            items = [model.prompts.encode(list(imgs), q) for imgs, q in zip(images, questions)]
            device = next(core_vlm(model.vlm).parameters()).device
            batch = model.prompts.collate(items, with_answers=False).to(device)
            features = vision_features(model.vlm, batch)
        memory = model.memory_for(batch, [img for imgs in images for img in imgs], features, branch, intervention)
        return [None if memory is None else memory[i].to(self.dtype) for i in range(len(questions))]

    def sampling(self, max_new_tokens: int, n: int = 1, temperature: float = 0.0, seed: int | None = None,
                 logprobs: bool = False, top_p: float = 1.0, top_logprobs: int = 0):
        """vLLM's sampling settings for one question; `top_logprobs` > 0 also returns each token's k likeliest."""
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                              logprobs=top_logprobs if top_logprobs else 0 if logprobs else None,
                              bad_words=self.banned, stop_token_ids=self.stop_ids, detokenize=False)

    def sync_weights(self, vlm) -> int:
        """Load a training VLM's LoRA-changed weights, merged (`export.lora_merged_weights`), into the running engine
        in its dtype, so the next generation samples the policy as the last optimiser step left it. Returns how many
        tensors were sent (0: the VLM has no LoRA)."""
        from safetensors.torch import save

        weights = {name: tensor.to(self.dtype).contiguous() for name, tensor in lora_merged_weights(vlm)}
        if weights:  # as safetensors bytes: vLLM's RPC to an engine in its own process does not carry tensors
            self.llm.collective_rpc("load_named_weights", args=(save(weights),))
            # the worker's reload clears its encoder and multimodal caches; the scheduler's must follow, or the next
            # image is a cache miss
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
        return len(weights)

    def close(self) -> None:
        """Stop vLLM's engine (its process, when it has one) and remove the exported folder."""
        import shutil

        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)

    def generate(self, images: Sequence[Sequence[Image.Image]], questions: Sequence[str], max_new_tokens: int = 16,
                 branch: str | None = None, *, n: int = 1, temperature: float = 0.0,
                 seed: int | Sequence[int] | None = None, top_p: float = 1.0, logprobs: bool = False,
                 intervention: str = "zero",
                 memory_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 memories: Sequence[torch.Tensor | None] | None = None,
                 systems: Sequence[str] | None = None, params: Sequence | None = None) -> list[list[Completion]]:
        """`n` continuations per question (greedy when `temperature` is 0). `images[i]`: question i's images.
        `memories` overrides the model's own (one (N, H) tensor or None per question); `memory_transform` maps each
        memory as `MedSynapseV.answer_encoded`'s does; `systems`: a system message per question ("" for none);
        `seed`: one for every question, or one per question (its `n` draws); `params`: `sampling(...)` per question
        instead (their own n, seed, top_p and top log-probabilities; the log-probabilities returned when asked)."""
        if memories is None:
            memories = self.memories(images, questions, branch, intervention)
        if memory_transform is not None:
            memories = [None if m is None else memory_transform(m[None])[0].to(self.dtype) for m in memories]
        systems = systems or [""] * len(questions)
        conversations = [chat_messages(imgs, q, m, system)
                         for imgs, q, m, system in zip(images, questions, memories, systems)]
        with_memory = any(m is not None for m in memories)
        if with_memory and not all(m is not None for m in memories):
            raise ValueError("give a memory for every question or for none")
        if params is None:
            seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(questions)
            params = [self.sampling(max_new_tokens, n, temperature, s, logprobs, top_p) for s in seeds]
        outputs = self.llm.chat(conversations, list(params),
                                use_tqdm=False, add_generation_prompt=not with_memory,
                                continue_final_message=with_memory, chat_template_content_format="openai")
        return [[self.completion(out, p.logprobs is not None) for out in request.outputs]
                for request, p in zip(outputs, params)]

    def completion(self, output, logprobs: bool) -> Completion:
        """A vLLM completion, its text decoded as `MedSynapseV.answer_encoded` decodes (vLLM's incremental
        detokenizer holds back a trailing incomplete UTF-8 byte that `batch_decode` shows as U+FFFD)."""
        ids = list(output.token_ids)
        text = self.model.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if not logprobs:
            return Completion(ids, text)
        top = [[(token, float(entry.logprob)) for token, entry in
                sorted(step.items(), key=lambda item: item[1].rank or 0)] for step in output.logprobs]
        return Completion(ids, text, token_logprobs(output.logprobs, ids), top)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 16,
               branch: str | None = None) -> list[str]:
        """Greedy answers, one image per question: `MedSynapseV.answer` through vLLM."""
        outputs = self.generate([[image] for image in images], questions, max_new_tokens, branch)
        return [out[0].text for out in outputs]
