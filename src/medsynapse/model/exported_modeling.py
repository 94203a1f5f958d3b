"""MedSynapse-V's encoder-free student for plain transformers: shipped as `modeling_medsynapse.py` by
`medsynapse export`, loaded with `AutoModelForImageTextToText.from_pretrained(FOLDER, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)`. It imports nothing but torch and transformers.

Plan of `generate(**processor(text=[chat prompt], images=[image]))`:
1. N memory slots (`<|latent|>`) are appended to each (left-padded) prompt, where the assistant's answer starts;
2. the vision tower encodes the images once; A_psi (`AutonomousMemory`, the weights under `memory.`) pools each
   question's merged visual tokens into N memory vectors;
3. the slots' input embeddings are replaced by those vectors, explicit 4-row position ids (text row + M-RoPE t/h/w)
   are computed, and the stock Qwen3-VL `generate` runs from those embeddings with the cached vision features,
   greedy unless told otherwise, never emitting a structural token (image pads, vision markers, the slot token);
4. it returns the prompt as given followed by the new tokens, as `generate` does for any decoder.
This is the computation of MedSynapse's own `MedSynapseV.answer` (model/vlm.py and model/memory.py), written again
so that the folder needs no MedSynapse install; `medsynapse export`'s test holds the two to the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor


class MedSynapseQwen3VLConfig(Qwen3VLConfig):
    """Qwen3-VL's config plus `medsynapse`: the memory's settings (`autonomous`: A_psi's config; `latent_token_id`;
    `suppress_token_ids`)."""

    model_type = "medsynapse_qwen3_vl"
    medsynapse: dict | None = None


class MedSynapseQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor for images only (no video processor, so no torchvision), prompts left-padded."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)
        self.tokenizer.padding_side = "left"


def sincos_2d(grid: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (h*w, dim)."""
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freq[None]
        parts += [angles.sin(), angles.cos()]
    pos = torch.cat(parts, dim=1)
    return nn.functional.pad(pos, (0, dim - pos.shape[1]))


class AutonomousMemory(nn.Module):
    """A_psi at inference: N memory vectors from the VLM's merged visual tokens (attention or grid pooling, then a
    2-layer MLP, LayerNorm and a gain); parameter names as MedSynapse saves them."""

    def __init__(self, settings: dict):
        super().__init__()
        self.settings = settings
        hidden = settings["hidden_size"]
        inner = settings.get("mlp_hidden") or hidden
        n_memory, pooling = settings["n_memory"], settings.get("pooling", "grid")
        if pooling == "attention":
            width = settings.get("attention_dim", 256)
            self.key_norm = nn.LayerNorm(hidden)
            self.key_proj = nn.Linear(hidden, width)
            self.queries = nn.Parameter(torch.zeros(n_memory, width))
        else:
            self.side = int(round(n_memory ** 0.5))
        self.slot_embed = nn.Parameter(torch.zeros(n_memory, hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.gain = nn.Parameter(torch.tensor(1.0))
        max_images = settings.get("max_images", 1)
        tagged = pooling == "attention" and max_images > 1
        self.image_embed = nn.Parameter(torch.zeros(max_images - 1, settings.get("attention_dim", 256))) if tagged \
            else None

    def forward(self, visual_tokens, grids: list[tuple[int, int]], images_per_sample: list[int]) -> torch.Tensor:
        """Per-image merged tokens (the vision tower's `pooler_output`) -> memory (B, N, H)."""
        if self.settings.get("pooling", "grid") == "attention":
            x = self._attend(visual_tokens, grids, images_per_sample)
        else:
            x = self._grid(visual_tokens, grids, images_per_sample)
        return self.norm(self.mlp(x + self.slot_embed)) * self.gain

    def _attend(self, visual_tokens, grids, images_per_sample) -> torch.Tensor:
        width = self.settings.get("attention_dim", 256)
        keys = [self.key_proj(self.key_norm(t)) + sincos_2d(g, width, t.device).to(t.dtype)
                for t, g in zip(visual_tokens, grids)]
        if self.image_embed is not None:  # image k of its question: + its index embedding (none for the first)
            index = torch.cat([torch.arange(int(c)) for c in images_per_sample]).to(self.image_embed.device)
            if int(index.max()) >= self.settings["max_images"]:
                raise ValueError(f"a question has {int(index.max()) + 1} images; this memory tells at most "
                                 f"{self.settings['max_images']} apart")
            table = torch.cat([self.image_embed.new_zeros(1, self.image_embed.shape[1]), self.image_embed])[index]
            keys = [k + table[i].to(k.dtype) for i, k in enumerate(keys)]
        per_sample_keys, per_sample_values, start = [], [], 0
        for count in images_per_sample:
            per_sample_keys.append(torch.cat(keys[start:start + count]))
            per_sample_values.append(torch.cat(list(visual_tokens[start:start + count])))
            start += count
        key = nn.utils.rnn.pad_sequence(per_sample_keys, batch_first=True)
        value = nn.utils.rnn.pad_sequence(per_sample_values, batch_first=True)
        lengths = torch.tensor([len(k) for k in per_sample_keys], device=key.device)
        padding = torch.arange(key.shape[1], device=key.device)[None] >= lengths[:, None]
        scores = torch.einsum("nd,bkd->bnk", self.queries.to(key.dtype), key) / width ** 0.5
        weights = scores.masked_fill(padding[:, None], float("-inf")).softmax(-1)
        return weights @ value

    def _grid(self, visual_tokens, grids, images_per_sample) -> torch.Tensor:
        slots = []
        for tokens, (h, w) in zip(visual_tokens, grids):
            image = tokens.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)
            pooled = nn.functional.adaptive_avg_pool2d(image, (self.side, self.side))
            slots.append(pooled.flatten(2).squeeze(0).transpose(0, 1))
        per_sample, start = [], 0
        for count in images_per_sample:
            per_sample.append(torch.stack(slots[start:start + count]).mean(0))
            start += count
        return torch.stack(per_sample)


class MedSynapseQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL (the LoRA merged in) + A_psi: `generate` answers with the encoder-free memory (module docstring)."""

    config_class = MedSynapseQwen3VLConfig
    _keep_in_fp32_modules = ["memory"]  # A_psi runs in float32, as MedSynapse runs it

    def __init__(self, config: MedSynapseQwen3VLConfig):
        super().__init__(config)
        # (type: ignore here and below: this file imports only torch and transformers, so no typing.cast; an exported
        # config always has `medsynapse`, and transformers types vision_config as dict | PreTrainedConfig | None)
        self.memory = AutonomousMemory(config.medsynapse["autonomous"])  # type: ignore[index]

    @property
    def n_memory(self) -> int:
        return int(self.config.medsynapse["autonomous"]["n_memory"])

    def with_memory_slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          mm_token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts with N memory slots at their end (left padding keeps every row's end at the last column)."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded (the processor's tokenizer.padding_side = 'left')")
        rows, n = input_ids.shape[0], self.n_memory
        slots = torch.full((rows, n), self.config.medsynapse["latent_token_id"], dtype=input_ids.dtype,
                           device=input_ids.device)
        return (torch.cat([input_ids, slots], 1), torch.cat([attention_mask, torch.ones_like(slots)], 1),
                torch.cat([mm_token_type_ids, torch.zeros_like(slots)], 1))

    def memory_vectors(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor, features) -> torch.Tensor:
        """A_psi's memory (B, N, H) from the vision features; a question's images are its vision-start markers."""
        merge = self.config.vision_config.spatial_merge_size  # type: ignore[union-attr]  # (see __init__)
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]
        counts = (input_ids == self.config.vision_start_token_id).sum(1).tolist()
        if sum(counts) != len(grids) or min(counts) < 1:
            raise ValueError(f"every question needs at least one image; the prompts show {counts} for {len(grids)} "
                             "images")
        return self.memory(features.pooler_output, grids, counts)

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """4-row position ids: row 0 the text position for the causal mask, rows 1-3 the M-RoPE t/h/w indices."""
        pos3, _ = self.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                            attention_mask=attention_mask)
        mask = attention_mask.long()
        text = ((mask.cumsum(-1) - 1).clamp(min=0) * mask)[None]
        return torch.cat([text.to(pos3.dtype), pos3])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, **kwargs):
        """Greedy answers with the memory (module docstring); the prompt followed by the new tokens."""
        if input_ids is None or pixel_values is None or image_grid_thw is None:
            raise ValueError("the memory is read from the image: give input_ids, pixel_values and image_grid_thw as "
                             "the processor returns them for a prompt with an image")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).long()
        ids, mask, types = self.with_memory_slots(input_ids, attention_mask, mm_token_type_ids)
        features = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        memory = self.memory_vectors(ids, image_grid_thw, features)
        embeds = self.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.config.medsynapse["latent_token_id"]).unsqueeze(-1),
                                       memory.to(embeds.dtype))
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("suppress_tokens", self.config.medsynapse["suppress_token_ids"])
        new = super().generate(inputs_embeds=embeds, attention_mask=mask,
                               position_ids=self.position_ids_for(ids, mask, types, image_grid_thw),
                               mm_encoder_outputs={"image": features}, image_grid_thw=image_grid_thw, **kwargs)
        if isinstance(new, torch.Tensor):
            return torch.cat([input_ids, new], 1)
        new.sequences = torch.cat([input_ids, new.sequences], 1)
        return new
