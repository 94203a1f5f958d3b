"""vLLM's Qwen3-VL, able to take memory rows among its multimodal embeddings (imported by vLLM through the plugin).

Memory vectors reach the model through vLLM's prompt-embeds chat route: they are cached and merged like an encoder's
output, so `_compute_deepstack_embeds` receives them next to the image embeddings. Image rows are
`hidden × (1 + deepstack levels)` wide (the main embedding, then one slice per DeepStack level); memory rows are
`hidden` wide. Stock Qwen3-VL concatenates both and crashes. Here memory rows get zeros for their DeepStack part,
which is what transformers does (DeepStack adds to image positions only), so both paths compute the same thing.

`compute_logits` also gives -inf to the rows the export padded (engines/export.py: a spare row for vLLM's placeholder
token), so greedy choices and log-probabilities are the unpadded model's.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from medsynapse.engines.export import VOCAB_ROWS_KEY


def pad_memory_rows(embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """`embeddings` (n, w) widened to (n, width) with zeros: a memory span gets no DeepStack contribution; an image
    span (already `width` wide) is returned as it is."""
    if embeddings.shape[-1] == width:
        return embeddings
    return torch.cat([embeddings, embeddings.new_zeros(embeddings.shape[0], width - embeddings.shape[-1])], dim=-1)


def mask_padded_vocab(logits: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Logits with every column from `rows` on set to -inf (unchanged when `rows` is None)."""
    if rows is not None and logits.shape[-1] > rows:
        logits[..., rows:] = float("-inf")
    return logits


class MedSynapseQwen3VL(Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose multimodal embeddings may include hidden-wide memory spans (see the module docstring)."""

    def _compute_deepstack_embeds(self, inputs_embeds, multimodal_embeddings, is_multimodal):
        width = self.visual_dim + self.multiscale_dim
        padded = [pad_memory_rows(e, width) for e in multimodal_embeddings]
        return super()._compute_deepstack_embeds(inputs_embeds, padded, is_multimodal)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        if logits is None:
            return None
        return mask_padded_vocab(logits, getattr(self.config, VOCAB_ROWS_KEY, None))
