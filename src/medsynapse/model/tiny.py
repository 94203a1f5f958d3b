"""Build a tiny, real-architecture Qwen3-VL offline: local BPE tokenizer, Qwen special tokens, chat template.

The folder it writes loads through exactly the path that loads Qwen3-VL-8B from a local folder (`load_vlm`), so tests
and the demo exercise the production code, not a mock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from medsynapse.locking import make_tree_readable
from medsynapse.model.vlm import LATENT_TOKEN, ImageOnlyQwen3VLProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", LATENT_TOKEN, "<think>", "</think>"]

# Qwen style; no `{%- -%}` next to the newlines (it would strip the "\n" after the role).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class TinyVLMSpec:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_hidden: int = 64
    vision_depth: int = 2
    vocab_size: int = 1024
    image_size: int = 64  # the data's image size
    vlm_resolution: int = 0  # > 0: images are resized to this side before patching (patch 16 x merge 2 = 32 px/token)
    seed: int = 0


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(lines), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_vlm(out_dir: str | Path, corpus: Iterable[str], spec: TinyVLMSpec | None = None) -> Path:
    """Train the tokenizer, build a random-weight tiny Qwen3-VL and save model + processor to `out_dir`."""
    spec = spec or TinyVLMSpec()
    out_dir = Path(out_dir)
    tok = train_tokenizer(corpus, spec.vocab_size)
    side = spec.vlm_resolution or spec.image_size
    pixels = side * side
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2,  # size = pixel areas (min, max): set explicitly
        size={"shortest_edge": min(pixels, 32 * 32) if not spec.vlm_resolution else pixels,
              "longest_edge": max(pixels, 256 * 256)},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    ids: dict[str, Any] = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = spec.hidden // spec.heads
    quarter = head_dim // 2
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]  # sums to head_dim / 2
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, head_dim=head_dim, max_position_embeddings=4096,
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": section,
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden,
                           intermediate_size=2 * spec.vision_hidden, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           out_hidden_size=spec.hidden, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False, **ids)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    make_tree_readable(out_dir)  # safetensors writes 0600: others may read the base a released model needs
    return out_dir
