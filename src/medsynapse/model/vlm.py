"""Qwen3-VL with memory slots: loading, prompts, 3D M-RoPE positions, forward and generate with spliced memory.

Memory enters as N placeholder tokens (``<|latent|>``) placed after the question, at the start of the assistant turn,
before the answer. Their embedding rows are replaced by memory vectors; everything else is the model's own path:
pixels (or cached vision features) are always passed, so DeepStack runs, and explicit 4-row position ids from
``get_rope_index`` are always passed, so the image keeps its 2-D rotary layout. See docs/design.md, decision 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from medsynapse.model.processor import (  # noqa: F401  (re-exported: the loading API lives here too)
    LATENT_TOKEN,
    ImageOnlyQwen3VLProcessor,
    ModelNotFoundError,
    load_processor,
    resolve_local_model,
)


def load_vlm(path: str | Path, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False,
             device: str | torch.device = "cpu") -> tuple[Qwen3VLForConditionalGeneration, ImageOnlyQwen3VLProcessor]:
    """Load Qwen3-VL and its processor from a local folder (tiny test model or Qwen3-VL-8B alike)."""
    folder = resolve_local_model(path)
    processor = load_processor(folder)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    latent_id = processor.tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
    if latent_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    # (transformers wraps `to` with functools.wraps, so its stub takes `self` for the device)
    return model.to(device), processor  # type: ignore[arg-type]


@dataclass
class PromptBatch:
    """A left-padded batch ready for the VLM; `labels` is -100 except on answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    labels: torch.Tensor | None = None
    images_per_sample: list[int] | None = None

    def to(self, device: torch.device | str) -> PromptBatch:
        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return PromptBatch(*(move(getattr(self, name)) for name in self.__dataclass_fields__))

    def image_rows(self, rows: list[int]) -> list[int]:
        """Indices of the images that belong to `rows`, in order."""
        counts = self.images_per_sample or [1] * self.input_ids.shape[0]
        starts = [sum(counts[:r]) for r in range(len(counts))]
        return [starts[r] + k for r in rows for k in range(counts[r])]

    def select(self, rows: list[int]) -> PromptBatch:
        """A batch of the given rows (repeats allowed: G rollouts of one prompt are `[i] * G`)."""
        images = self.image_rows(rows)
        patches = self.image_grid_thw.prod(-1).tolist()
        offsets = [sum(patches[:i]) for i in range(len(patches))]
        pixel_values = torch.cat([self.pixel_values[offsets[i]:offsets[i] + patches[i]] for i in images])
        index = torch.tensor(rows, device=self.input_ids.device)
        counts = self.images_per_sample or [1] * self.input_ids.shape[0]
        return PromptBatch(self.input_ids[index], self.attention_mask[index], self.mm_token_type_ids[index],
                           pixel_values, self.image_grid_thw[images],
                           None if self.labels is None else self.labels[index], [counts[r] for r in rows])


@dataclass
class EncodedPrompt:
    """One sample's processor output (unpadded); cached by datasets so images are processed once."""

    input_ids: torch.Tensor  # (L,)
    mm_token_type_ids: torch.Tensor  # (L,)
    pixel_values: torch.Tensor  # (patches, D)
    image_grid_thw: torch.Tensor  # (n_images, 3)
    answer_ids: torch.Tensor  # (A,) empty at inference


def with_slots(item: EncodedPrompt, n: int, latent_id: int) -> EncodedPrompt:
    """The same encoded prompt with `n` latent slots at its end instead of the ones it has: what encoding it with
    `PromptBuilder(n_memory=n)` gives (the slots are the prompt's last tokens), without running the processor again."""
    ids = item.input_ids
    k = int((ids == latent_id).sum())
    if k and not bool((ids[len(ids) - k:] == latent_id).all()):
        raise ValueError("the latent slots must be the prompt's last tokens")
    keep = len(ids) - k
    return dataclasses.replace(
        item, input_ids=torch.cat([ids[:keep], torch.full((n,), latent_id, dtype=ids.dtype)]),
        mm_token_type_ids=torch.cat([item.mm_token_type_ids[:keep],
                                     torch.zeros(n, dtype=item.mm_token_type_ids.dtype)]))


STRUCTURAL_TOKENS = (LATENT_TOKEN, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def structural_token_ids(tokenizer) -> list[int]:
    """Tokens a generation must never emit: a sampled <|image_pad|> in a completion makes the next forward find more
    image slots than image features ("Image features and image tokens do not match"), a sampled <|latent|> an extra
    memory slot."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in STRUCTURAL_TOKENS if t in vocab]


class PromptBuilder:
    """Chat prompts with N memory slots between question and answer, using the model's own chat template."""

    def __init__(self, processor: ImageOnlyQwen3VLProcessor, n_memory: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.n_memory = n_memory
        self.latent_id = self.tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.suppressed_ids = structural_token_ids(self.tokenizer)

    def prompt_text(self, question: str, n_images: int, system: str = "") -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        text = self.processor.apply_chat_template([*messages, {"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return text + LATENT_TOKEN * self.n_memory

    def encode(self, images: list[Image.Image], question: str, answer: str | None = None,
               system: str = "") -> EncodedPrompt:
        enc = self.processor(text=[self.prompt_text(question, len(images), system)], images=images,
                             return_tensors="pt")
        if answer is None:
            answer_ids = torch.zeros(0, dtype=torch.long)
        else:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            answer_ids = torch.tensor([*ids, self.eos_id], dtype=torch.long)
        return EncodedPrompt(enc["input_ids"][0], enc["mm_token_type_ids"][0], enc["pixel_values"],
                             enc["image_grid_thw"], answer_ids)

    def collate(self, items: list[EncodedPrompt], with_answers: bool | None = None) -> PromptBatch:
        """Left-pad prompts (+ answers when present) into one batch."""
        if with_answers is None:
            with_answers = all(len(item.answer_ids) > 0 for item in items)
        seqs = [torch.cat([it.input_ids, it.answer_ids]) if with_answers else it.input_ids for it in items]
        length = max(len(s) for s in seqs)
        pad_id = self.tokenizer.pad_token_id
        batch = len(items)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        mm_types = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for row, (item, seq) in enumerate(zip(items, seqs)):
            start = length - len(seq)
            input_ids[row, start:] = seq
            attention[row, start:] = 1
            mm_types[row, start:start + len(item.mm_token_type_ids)] = item.mm_token_type_ids
            if with_answers:
                labels[row, length - len(item.answer_ids):] = item.answer_ids
        return PromptBatch(input_ids, attention, mm_types, torch.cat([it.pixel_values for it in items]),
                           torch.cat([it.image_grid_thw for it in items]), labels if with_answers else None,
                           [len(it.image_grid_thw) for it in items])


def core_vlm(model) -> Qwen3VLForConditionalGeneration:
    """The Qwen3-VL model under DDP / peft wrappers (attribute access through PeftModel lands one level too deep)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids_for(model: Qwen3VLForConditionalGeneration, batch: PromptBatch) -> torch.Tensor:
    """4-row position ids: row 0 the text position for the causal mask, rows 1-3 the M-RoPE t/h/w indices."""
    pos3, _ = core_vlm(model).model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                         image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
    mask = batch.attention_mask.long()
    text = ((mask.cumsum(-1) - 1).clamp(min=0) * mask)[None]
    return torch.cat([text.to(pos3.dtype), pos3])


def splice_memory(model: Qwen3VLForConditionalGeneration, input_ids: torch.Tensor, memory: torch.Tensor | None,
                  latent_id: int) -> torch.Tensor:
    """Input embeddings with the latent slots' rows replaced by `memory` (B, N, H), ordered (sample, slot)."""
    embeds = core_vlm(model).get_input_embeddings()(input_ids)
    if memory is None:
        return embeds
    slots = input_ids == latent_id
    per_row = slots.sum(dim=1)
    if not bool((per_row == memory.shape[1]).all()):
        raise ValueError(f"every row needs exactly {memory.shape[1]} memory slots, found {per_row.tolist()}")
    return embeds.masked_scatter(slots.unsqueeze(-1), memory.to(embeds.dtype))


def vision_features(model: Qwen3VLForConditionalGeneration, batch: PromptBatch):
    """The vision tower's output for a batch; pass it back as `mm_encoder_outputs` to skip re-encoding."""
    return core_vlm(model).model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)


def select_features(features, image_index: list[int]):
    """Vision features for a re-indexed list of images (e.g. each prompt's image repeated G times).

    Lets G rollouts and every branch reuse one vision-tower pass per prompt.
    """
    pooled = tuple(features.pooler_output[i] for i in image_index)
    deepstack = None
    if features.deepstack_features is not None:
        deepstack = [tuple(level[i] for i in image_index) for level in features.deepstack_features]
    return type(features)(last_hidden_state=None, pooler_output=pooled, deepstack_features=deepstack)


def _vision_kwargs(batch: PromptBatch, features) -> dict:
    if features is None:
        return {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
    return {"mm_encoder_outputs": {"image": features}, "image_grid_thw": batch.image_grid_thw}


def forward_with_memory(model, batch: PromptBatch, memory: torch.Tensor | None, latent_id: int,
                        features=None, labels: torch.Tensor | None = None, **kwargs):
    """One forward pass with memory spliced into the slots (memory None = plain placeholder embeddings)."""
    embeds = splice_memory(model, batch.input_ids, memory, latent_id)
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids_for(model, batch),
                 labels=labels, **_vision_kwargs(batch, features), **kwargs)


def is_sharded(model) -> bool:
    """Whether the VLM's weights are sharded over several processes (FSDP2's `fully_shard`): its `generate` must
    then keep every rank stepping until all are done (`synced_gpus`), or a rank that finished early would stop
    taking part in the gathers the others wait on."""
    from torch.distributed.fsdp import FSDPModule

    return (isinstance(core_vlm(model), FSDPModule) and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


@torch.no_grad()
def generate_with_memory(model, batch: PromptBatch, memory: torch.Tensor | None, latent_id: int,
                         max_new_tokens: int = 16, features=None, suppress_tokens: list[int] | None = None,
                         **generate_kwargs) -> torch.Tensor:
    """Cached generation from spliced embeddings; returns only the new tokens (B, T).

    Route B of qwen3vl-recipes.md §8: embeddings + explicit 4-row positions, which `generate` extends by one per step.
    """
    embeds = splice_memory(model, batch.input_ids, memory, latent_id)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("synced_gpus", is_sharded(model))
    return model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                          position_ids=position_ids_for(model, batch), max_new_tokens=max_new_tokens,
                          suppress_tokens=suppress_tokens or [latent_id], **_vision_kwargs(batch, features),
                          **generate_kwargs)


def completion_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS (all tokens when truncated), else 0."""
    is_eos = tokens == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def append_completions(batch: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor) -> PromptBatch:
    """Prompt (left-padded) + completion (right-padded) as one batch; completion tokens are text (type 0)."""
    return PromptBatch(torch.cat([batch.input_ids, tokens], 1), torch.cat([batch.attention_mask, mask], 1),
                       torch.cat([batch.mm_token_type_ids, torch.zeros_like(tokens)], 1), batch.pixel_values,
                       batch.image_grid_thw, None, batch.images_per_sample)


def completion_logprobs(model, batch: PromptBatch, memory: torch.Tensor | None, tokens: torch.Tensor,
                        mask: torch.Tensor, latent_id: int, features=None, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | image, question, memory, o_<t) for each completion token (N, T); 0 where `mask` is 0.

    Only the completion's logits are kept (`logits_to_keep`), so the full-vocabulary tensor is (N, T+1, V).
    Logits are divided by `temperature`, as TRL does for the sampling temperature.
    """
    full = append_completions(batch, tokens, mask)
    width = tokens.shape[1]
    logits = forward_with_memory(model, full, memory, latent_id, features=features,
                                 logits_to_keep=width + 1).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def completion_logprobs_at(model, batch: PromptBatch, memory: torch.Tensor | None, tokens: torch.Tensor,
                           mask: torch.Tensor, latent_id: int, features=None,
                           temperatures: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, ...]:
    """`completion_logprobs` at several temperatures from ONE forward: one (N, T) tensor per entry of `temperatures`.

    Each is computed from the shared logits exactly as `completion_logprobs` computes it (logits / T, log-softmax,
    gather), so it equals that function's result at the same T; repeated temperatures are computed once.
    """
    full = append_completions(batch, tokens, mask)
    width = tokens.shape[1]
    logits = forward_with_memory(model, full, memory, latent_id, features=features,
                                 logits_to_keep=width + 1).logits[:, :-1].float()
    index = tokens.unsqueeze(-1)
    done: dict[float, torch.Tensor] = {}
    for temperature in temperatures:
        if temperature not in done:
            scaled = logits if temperature == 1.0 else logits / temperature
            done[temperature] = torch.gather(scaled.log_softmax(-1), 2, index).squeeze(-1) * mask
    return tuple(done[t] for t in temperatures)


def completion_outputs(model, batch: PromptBatch, memory: torch.Tensor | None, tokens: torch.Tensor,
                       mask: torch.Tensor, latent_id: int, features=None, hidden: bool = False) -> torch.Tensor:
    """Per-position outputs that predict each completion token: logits (N, T, V), or the final (normed) hidden states
    (N, T, H) when `hidden` (for the fused JSD, which applies lm_head chunk by chunk)."""
    full = append_completions(batch, tokens, mask)
    width = tokens.shape[1]
    if hidden:
        out = forward_with_memory(model, full, memory, latent_id, features=features, output_hidden_states=True,
                                  logits_to_keep=1)
        return out.hidden_states[-1][:, -(width + 1):-1]
    return forward_with_memory(model, full, memory, latent_id, features=features,
                               logits_to_keep=width + 1).logits[:, :-1]
