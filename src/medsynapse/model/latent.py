"""Latent-reasoning loops on Qwen3-VL: k continuous thoughts after the question, each the input of the next step.

The engine the latent baselines share (Coconut† now; MCOUT-Multi† and IVT-LR† build on the same loop). A prompt ends
with k `<|latent|>` slots (PromptBuilder with n_memory = k, exactly where MedSynapse-V's memory goes). Thought 1 is
the last-layer hidden state at the position before slot 1 (the end of the question); thought j+1 is the last-layer
hidden state at slot j once thought j is written there; `transform` maps each hidden state to the slot's input
(identity for Coconut; MCOUT's latent attention module). The thoughts then enter the slots through the same splice as
MedSynapse-V's memory, so answering (`generate_with_memory`) and training (`forward_with_memory`) are the plain paths.

How it runs (what the public codes do not: batch size 1, no KV cache, 1-D positions; ../shared/reference/
latent-peers.md): the whole batch at once, left-padded; pass 0 encodes the prompt before the slots with the image
(pixels or cached vision features, so DeepStack is applied) into a KV cache; each later pass feeds ONE new position
(the thought just written) with the cache. Every position gets its explicit 4-row M-RoPE ids from `get_rope_index`
over the full prompt (the slots are text positions, t = h = w = the text index), the ids the uncached forward gives
it. Later passes hold no image token, so they need no pixels: the image's keys and values, DeepStack included, are
in the cache (as in transformers' own cached generation). Gradients flow through the cache when the caller trains
(keep gradient checkpointing off around the loop: a checkpointed layer would recompute without the cache).

`latent_thoughts_uncached` is the reference the public codes implement (a full forward per thought); tests check
that both give the same thoughts and `benchmarks/latent_loop.py` times them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache

from medsynapse.model.vlm import (
    PromptBatch,
    _vision_kwargs,
    core_vlm,
    forward_with_memory,
    position_ids_for,
    vision_features,
)


def slot_start(batch: PromptBatch, k: int, latent_id: int) -> int:
    """The first slot's column: a prompt-only batch ends with its k slots in every row (left padding)."""
    length = batch.input_ids.shape[1]
    if k < 1 or k >= length:
        raise ValueError(f"need 1 <= k < prompt length {length}, got k = {k}")
    if not bool((batch.input_ids[:, length - k:] == latent_id).all()):
        raise ValueError(f"every prompt must end with its {k} latent slots (a prompt-only batch, n_memory = k)")
    if bool((batch.input_ids[:, :length - k] == latent_id).any()):
        raise ValueError(f"a prompt has more than {k} latent slots")
    return length - k


def latent_thoughts(model, batch: PromptBatch, k: int, latent_id: int, features=None,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The k thoughts (B, k, H) of a prompt-only batch, one cached pass per thought after the prompt's pass."""
    start = slot_start(batch, k, latent_id)
    core = core_vlm(model)
    positions = position_ids_for(model, batch)
    embeds = core.get_input_embeddings()(batch.input_ids[:, :start])
    cache = DynamicCache(config=core.config)
    out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask[:, :start],
                position_ids=positions[..., :start], cache=cache, use_cache=True, output_hidden_states=True,
                logits_to_keep=1, **_vision_kwargs(batch, features))
    thoughts = []
    for j in range(k):
        hidden = out.hidden_states[-1][:, -1]
        thoughts.append(transform(hidden) if transform is not None else hidden)
        if j == k - 1:
            break
        column = start + j  # slot j + 1 (1-based) holds thought j + 1
        out = model(inputs_embeds=thoughts[-1][:, None].to(embeds.dtype),
                    attention_mask=batch.attention_mask[:, :column + 1], position_ids=positions[..., column:column + 1],
                    cache=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    return torch.stack(thoughts, dim=1)


def latent_thoughts_uncached(model, batch: PromptBatch, k: int, latent_id: int, features=None,
                             transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The same thoughts the public codes' way: a forward over the whole prompt for every thought (the slots not yet
    written hold their placeholder embedding; the causal mask keeps them from mattering)."""
    start = slot_start(batch, k, latent_id)
    core = core_vlm(model)
    placeholder = cast(nn.Embedding, core.get_input_embeddings()).weight[latent_id]
    written: list[torch.Tensor] = []
    for j in range(k):
        filler = placeholder.expand(batch.input_ids.shape[0], k - len(written), -1)
        memory = torch.cat([torch.stack(written, 1), filler], 1) if written else filler
        out = forward_with_memory(model, batch, memory, latent_id, features=features, labels=None,
                                  output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, start - 1 + j]
        written.append(transform(hidden) if transform is not None else hidden)
    return torch.stack(written, dim=1)


@dataclass
class LatentAttentionConfig:
    hidden_size: int  # the VLM's text width
    attention_dim: int = 2048  # MCOUT-Multi's reference width
    heads: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


class MultimodalLatentAttention(nn.Module):
    """MCOUT-Multi's module (Hanhpt23/OmniMod, `MultimodalLatentAttention`): the thought attends over the prompt's
    visual + text input embeddings. query = Linear(H -> d)(h); multi-head attention (d, heads; keys and values of
    width H) over those embeddings, padding and the latent slots masked; residual + LayerNorm; Linear(d -> H);
    LayerNorm."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        self.config = config
        hidden, width = config.hidden_size, config.attention_dim
        self.query = nn.Linear(hidden, width)
        self.attention = nn.MultiheadAttention(width, config.heads, kdim=hidden, vdim=hidden, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, hidden)
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden (B, H) -> the thought (B, H); context (B, L, H) with `valid` (B, L) True where attended."""
        query = self.query(hidden.to(self.query.weight.dtype))[:, None]
        context = context.to(self.query.weight.dtype)
        attended, _ = self.attention(query, context, context, key_padding_mask=~valid, need_weights=False)
        return self.out_norm(self.out(self.norm(query + attended)))[:, 0]


def mixed_embeddings(model, batch: PromptBatch, latent_id: int, features=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's input embeddings with the image tokens replaced by the vision tower's merged features (what
    MCOUT-Multi attends over), and where they are valid: real tokens that are not latent slots."""
    core = core_vlm(model)
    embeds = core.get_input_embeddings()(batch.input_ids)
    features = features if features is not None else vision_features(model, batch)
    image = torch.cat(tuple(features.pooler_output)).to(embeds.dtype)
    slots = (batch.input_ids == core.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, image)
    valid = batch.attention_mask.bool() & (batch.input_ids != latent_id)
    return embeds, valid


def mcout_thoughts(model, module: MultimodalLatentAttention, batch: PromptBatch, k: int, latent_id: int,
                   features=None) -> torch.Tensor:
    """MCOUT-Multi's k thoughts: each last hidden state passed through the latent attention module over the prompt's
    visual + text embeddings, through the same cached loop."""
    features = features if features is not None else vision_features(model, batch)
    context, valid = mixed_embeddings(model, batch, latent_id, features)
    return latent_thoughts(model, batch, k, latent_id, features, transform=lambda h: module(h, context, valid))


class LastQueryHook:
    """Captures, at one decoder layer, the rotated query of the LAST input position (a forward pre-hook on the
    layer's attention: q_norm(q_proj(h)) with the rotary embedding of that position), so the attention of that
    position over every cached key can be computed without `output_attentions` (which returns all layers' (L, L)
    maps and forces eager attention)."""

    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.query: torch.Tensor | None = None
        self.handle = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        hidden = (args[0] if args else kwargs["hidden_states"])[:, -1:]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():  # it only chooses patches (top-K): no gradient, and no weight kept for a backward
            query = module.q_norm(module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)).transpose(1, 2)
            self.query, _ = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])

    def weights(self, keys: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) attention of the captured position over `keys` (B, kv_heads, L, d), averaged over heads."""
        assert self.query is not None  # captured by the layer's forward that ran before
        groups = self.query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)
        scores = (self.query.float() @ keys.float().transpose(-1, -2))[:, :, 0] * cast(float, self.attention.scaling)
        scores = scores.masked_fill(attention_mask[:, None, :keys.shape[2]] == 0, float("-inf"))
        return scores.softmax(-1).mean(1)

    def remove(self) -> None:
        self.handle.remove()


def ivt_latents(model, batch: PromptBatch, steps: int, patches: int, layer: int, latent_id: int,
                features=None) -> tuple[torch.Tensor, torch.Tensor]:
    """IVT-LR's latent steps: per step, the latent text (the last hidden state, as Coconut) then the `patches` image
    tokens the latent position attends to most at decoder layer `layer` (excluding those already chosen), inserted as
    new positions. The prompt must end with steps * (1 + patches) slots; returns the vectors for those slots
    (B, steps * (1 + patches), H) and the chosen image columns (B, steps, patches), in column order per step.

    The inserted patches carry the vision tower's merged feature of their token and get TEXT positions (the next
    indices, as every slot does), not their original (t, h, w) ids: the reference code rebuilds 1-D positions for the
    whole sequence; text ids keep the positions increasing in the cache, and the patch's content is its own.
    """
    slots = steps * (1 + patches)
    start = slot_start(batch, slots, latent_id)
    core = core_vlm(model)
    image_columns = batch.input_ids[:, :start] == core.config.image_token_id
    if bool((image_columns.sum(1) < steps * patches).any()):
        raise ValueError(f"{steps} steps x {patches} patches exceed an image's {int(image_columns.sum(1).min())} "
                         "merged tokens")
    features = features if features is not None else vision_features(model, batch)
    context, _ = mixed_embeddings(model, batch, latent_id, features)
    positions = position_ids_for(model, batch)
    cache = DynamicCache(config=core.config)
    out = model(inputs_embeds=core.get_input_embeddings()(batch.input_ids[:, :start]),
                attention_mask=batch.attention_mask[:, :start], position_ids=positions[..., :start], cache=cache,
                use_cache=True, output_hidden_states=True, logits_to_keep=1, **_vision_kwargs(batch, features))
    hook = LastQueryHook(core.model.language_model.layers[layer].self_attn)
    vectors, chosen = [], []
    taken = torch.zeros_like(image_columns)
    column = start
    try:
        for step in range(steps):
            thought = out.hidden_states[-1][:, -1:]
            vectors.append(thought)
            model(inputs_embeds=thought.to(context.dtype), attention_mask=batch.attention_mask[:, :column + 1],
                  position_ids=positions[..., column:column + 1], cache=cache, use_cache=True, logits_to_keep=1)
            # (a DynamicLayer, its keys filled by the step above; transformers types the layers as a union of kinds)
            weights = hook.weights(cast(Any, cache.layers[layer % len(cache.layers)]).keys,
                                   batch.attention_mask)[:, :start]
            weights = weights.masked_fill(~image_columns | taken, float("-inf"))
            picked = weights.topk(patches, dim=-1).indices.sort(-1).values
            taken.scatter_(1, picked, True)
            chosen.append(picked)
            patch = context.gather(1, picked[..., None].expand(-1, -1, context.shape[-1]))
            vectors.append(patch)
            if step < steps - 1:
                out = model(inputs_embeds=patch, attention_mask=batch.attention_mask[:, :column + 1 + patches],
                            position_ids=positions[..., column + 1:column + 1 + patches], cache=cache, use_cache=True,
                            output_hidden_states=True, logits_to_keep=1)
            column += 1 + patches
    finally:
        hook.remove()
    return torch.cat(vectors, 1), torch.stack(chosen, 1)
