"""Memory modules: the Diagnostic Memory Sampler P_phi (probes cross-attending to prior tokens)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class SamplerConfig:
    prior_dim: int
    hidden_size: int  # the VLM's text hidden size (memory vectors are input embeddings)
    n_memory: int = 16
    width: int = 256
    layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    embed_rms: float = 1.0  # RMS of the VLM's embedding rows: the scale the memory starts at
    # Images of one question the probes tell apart by a learned image-index embedding (the first image has none, so
    # a single-image question's memory is what it always was). 1: no embedding; the probes still attend over every
    # image's tokens, which then differ only by content (folders written before multi-image memory read as 1).
    max_images: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def check_image_counts(images_per_sample: list[int], rows: int) -> None:
    """Counts of images per question that cover `rows` per-image rows, each at least 1."""
    if any(int(c) < 1 for c in images_per_sample) or sum(int(c) for c in images_per_sample) != rows:
        raise ValueError(f"images_per_sample {list(images_per_sample)} must be counts >= 1 summing to the {rows} "
                         "images given")


def pack_images(tokens: torch.Tensor, drop: torch.Tensor | None, images_per_sample: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Every image's tokens (I, M, d) -> one row per question: (B, K·M, d) with K its largest image count, the drop
    mask laid out the same way (None stays None), each token's image index within its question (B, K·M) and the
    padding (B, K·M) (True where a question has fewer than K images)."""
    check_image_counts(images_per_sample, tokens.shape[0])
    images_per_sample = [int(c) for c in images_per_sample]
    m, k = tokens.shape[1], max(images_per_sample)
    batch = len(images_per_sample)
    packed = tokens.new_zeros(batch, k * m, tokens.shape[2])
    packed_drop = None if drop is None else torch.zeros(batch, k * m, dtype=torch.bool, device=tokens.device)
    padding = torch.ones(batch, k * m, dtype=torch.bool, device=tokens.device)
    start = 0
    for row, count in enumerate(images_per_sample):
        packed[row, : count * m] = tokens[start:start + count].reshape(count * m, -1)
        if drop is not None:
            assert packed_drop is not None  # made whenever drop is given
            packed_drop[row, : count * m] = drop[start:start + count].reshape(-1)
        padding[row, : count * m] = False
        start += count
    index = torch.arange(k, device=tokens.device).repeat_interleave(m).expand(batch, -1)
    return packed, packed_drop, index, padding


def image_index_embedding(table: torch.Tensor | None, index: torch.Tensor, max_images: int) -> torch.Tensor | None:
    """(…, width) embedding of each position's image index: zero for the first image, `table[k - 1]` for image k;
    None without a table (max_images 1). More images than `max_images` is an error, not a silent reuse of rows."""
    if table is None:
        return None
    if int(index.max()) >= max_images:
        raise ValueError(f"a question has {int(index.max()) + 1} images; this memory module tells at most "
                         f"{max_images} apart (max_images)")
    rows = torch.cat([table.new_zeros(1, table.shape[1]), table])
    return rows[index]


def sincos_2d(grid: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (Hf*Wf, dim): lets the probes tell *where* a finding is."""
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


class SamplerBlock(nn.Module):
    """Pre-norm probe self-attention, cross-attention to the prior tokens, and an FFN."""

    def __init__(self, width: int, heads: int, ffn_mult: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, probes: torch.Tensor, context: torch.Tensor, drop: torch.Tensor | None,
                weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`weights`: a list that receives this block's cross-attention weights (B, N, M), averaged over heads."""
        x = self.norm_self(probes)
        probes = probes + self.self_attn(x, x, x, need_weights=False)[0]
        kv = self.norm_kv(context)
        attended, attention = self.cross_attn(self.norm_q(probes), kv, kv, key_padding_mask=drop,
                                              need_weights=weights is not None)
        if weights is not None:
            weights.append(attention)
        probes = probes + attended
        return probes + self.ffn(self.norm_ffn(probes))


class DiagnosticMemorySampler(nn.Module):
    """P_phi: N learnable meta-query probes read the prior tokens through a 2-layer cross-attention transformer.

    Output vectors are RMS-normalised and multiplied by a learnable gain initialised to the VLM embeddings' RMS, so
    memory starts on the scale of the token embeddings it replaces (the reference code's unscaled projection does not).
    """

    def __init__(self, config: SamplerConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.input_norm = nn.LayerNorm(config.prior_dim)
        self.input_proj = nn.Linear(config.prior_dim, width)
        self.pos_proj = nn.Linear(width, width)
        self.probes = nn.Parameter(torch.randn(config.n_memory, width) * 0.02)
        self.blocks = nn.ModuleList(SamplerBlock(width, config.heads, config.ffn_mult) for _ in range(config.layers))
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, config.hidden_size)
        self.gain = nn.Parameter(torch.tensor(float(config.embed_rms)))
        # created last and without drawing random numbers: the other weights start as they always did
        self.image_embed = nn.Parameter(torch.zeros(config.max_images - 1, width)) if config.max_images > 1 else None

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], drop: torch.Tensor | None = None,
                weights: list[torch.Tensor] | None = None, images_per_sample: list[int] | None = None) -> torch.Tensor:
        """tokens (B, M, d_f) -> memory (B, N, H). `drop` (B, M) True = token removed from cross-attention.
        `weights`: a list that receives every block's cross-attention weights (B, N, M), averaged over heads.

        Several images per question: `tokens` (I, M, d_f) and `drop` (I, M) hold every image of the B questions in
        order and `images_per_sample` (B,) says how many each has. The probes of a question then attend over all its
        images' tokens at once (B, K·M keys, padded to the largest count K), each token with its 2-D position and,
        when `max_images` > 1, its image's index embedding; still N memory vectors per question. `weights` are then
        over the K·M padded positions. None, or one image each, is exactly the single-image computation."""
        if images_per_sample is not None and any(int(c) != 1 for c in images_per_sample):
            return self._forward_packed(tokens, grid, drop, weights, images_per_sample)
        tokens, drop = _zero_when_all_dropped(tokens, drop)
        # Both terms are learnt projections, so neither the positions nor the content swamps the other at init.
        pos = self.pos_proj(sincos_2d(grid, self.config.width, tokens.device).to(tokens.dtype))
        context = self.input_proj(self.input_norm(tokens)) + pos
        if self.image_embed is not None:  # keeps the embedding in every graph (DDP wants each parameter used): + 0
            context = context + 0.0 * self.image_embed.sum()
        return self._read(context, drop, weights)

    def _forward_packed(self, tokens: torch.Tensor, grid: tuple[int, int], drop: torch.Tensor | None,
                        weights: list[torch.Tensor] | None, images_per_sample: list[int]) -> torch.Tensor:
        tokens, drop, index, padding = pack_images(tokens, drop, images_per_sample)
        tokens, blocked = _zero_when_all_dropped(tokens, drop, padding)
        k = tokens.shape[1] // (grid[0] * grid[1])
        pos = self.pos_proj(sincos_2d(grid, self.config.width, tokens.device).to(tokens.dtype)).repeat(k, 1)
        context = self.input_proj(self.input_norm(tokens)) + pos
        tag = image_index_embedding(self.image_embed, index, self.config.max_images)
        if tag is not None:
            context = context + tag.to(context.dtype)
        return self._read(context, blocked, weights)

    def _read(self, context: torch.Tensor, drop: torch.Tensor | None, weights: list[torch.Tensor] | None):
        """The probes read the context through the blocks; RMS-normalised output at the learnt gain."""
        probes = self.probes.unsqueeze(0).expand(context.shape[0], -1, -1)
        for block in self.blocks:
            probes = block(probes, context, drop, weights)
        out = self.out_proj(self.out_norm(probes))
        rms = out.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return out * rms * self.gain


def _zero_when_all_dropped(tokens: torch.Tensor, drop: torch.Tensor | None, padding: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, key mask). A row whose every real token is dropped would attend to nothing (NaN): its tokens are
    zeroed and attended instead. `padding` (packed questions) stays masked either way."""
    if drop is None:
        return tokens, padding
    everything = (drop if padding is None else drop | padding).all(dim=1, keepdim=True)
    tokens = tokens.masked_fill(everything.unsqueeze(-1), 0.0)
    mask = drop & ~everything
    return tokens, (mask if padding is None else padding | mask)


@torch.no_grad()
def sampler_attention(sampler: DiagnosticMemorySampler, tokens: torch.Tensor, grid: tuple[int, int],
                      drop: torch.Tensor | None = None, images_per_sample: list[int] | None = None) -> torch.Tensor:
    """Where each probe looked: the cross-attention weights of every layer, (B, layers, N, Hf, Wf), each map summing
    to 1 over the prior tokens (a separate pass that asks for the weights; the memory itself is computed as always).
    Several images per question (`images_per_sample`): (B, layers, N, K, Hf, Wf), summing to 1 over all K images
    (0 on a question's padding images)."""
    weights: list[torch.Tensor] = []
    sampler(tokens, grid, drop, weights, images_per_sample)
    stacked = torch.stack(weights, dim=1)
    if images_per_sample is not None and any(int(c) != 1 for c in images_per_sample):
        return stacked.unflatten(-1, (max(images_per_sample), *grid))
    return stacked.unflatten(-1, grid)


def embedding_rms(embedding: nn.Embedding) -> float:
    """RMS of the VLM's input-embedding rows, the scale memory vectors should sit at."""
    weight = embedding.weight.detach().float()
    return float(weight.pow(2).mean(-1).sqrt().mean()) if weight.numel() else 1.0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


POOLINGS = ("attention", "grid")


@dataclass
class AutonomousConfig:
    hidden_size: int  # the VLM's text hidden size: merged visual tokens and memory vectors both live there
    n_memory: int = 16
    mlp_hidden: int = 0  # 0 = hidden_size (2 x H^2 weights: 33.6 M at Qwen3-VL-8B's H = 4096)
    embed_rms: float = 1.0
    pooling: str = "grid"  # attention (content-selective, recommended) | grid (folders written before it existed)
    attention_dim: int = 256  # query/key width of the attention pooling (H x 256 + N x 256 weights: ~1 M at 8B)
    max_images: int = 1  # attention pooling: images told apart by a learned index embedding on the keys (as P_phi)

    def to_dict(self) -> dict:
        return asdict(self)


class AutonomousMemoryModule(nn.Module):
    """A_psi: memory from the VLM's own merged visual tokens, so inference needs no prior encoder and no sampler.

    Pooling the visual tokens to N slots:
    - ``attention`` (recommended): N learned queries attend over all merged visual tokens of the sample's images
      (keys: a projection of the LayerNorm-ed tokens plus fixed 2-D sine-cosine positions; values: the tokens
      themselves). Each slot can pick the tokens that hold a finding wherever it is, as P_phi's probes do over the
      prior tokens; the attention maps show where the student looked. Several images: their tokens form one key set.
    - ``grid``: adaptive average pooling of each image's token grid to a sqrt(N) x sqrt(N) grid (no parameters, slot
      k always looks at the same part of the image). A lesion covering a few pixels is averaged with its cell, which
      is why a student built this way kept little of the presence evidence on SynthMed. Several images: averaged.
    Each slot then goes through a 2-layer MLP + LayerNorm and a learnable gain initialised to the embedding RMS.
    """

    def __init__(self, config: AutonomousConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"unknown A_psi pooling {config.pooling!r}; expected one of {POOLINGS}")
        self.config = config
        hidden, inner = config.hidden_size, config.mlp_hidden or config.hidden_size
        if config.pooling == "grid":
            side = int(round(config.n_memory ** 0.5))
            if side * side != config.n_memory:
                raise ValueError(f"n_memory must be a square number for grid pooling, got {config.n_memory}")
            self.side = side
        else:
            self.key_norm = nn.LayerNorm(hidden)
            self.key_proj = nn.Linear(hidden, config.attention_dim)
            self.queries = nn.Parameter(torch.randn(config.n_memory, config.attention_dim) * 0.02)
        self.slot_embed = nn.Parameter(torch.zeros(config.n_memory, hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.gain = nn.Parameter(torch.tensor(float(config.embed_rms)))
        # created last, zeros: the other weights start as they always did; the first image of a question has none
        tagged = config.pooling == "attention" and config.max_images > 1
        self.image_embed = nn.Parameter(torch.zeros(config.max_images - 1, config.attention_dim)) if tagged else None

    def pool(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Grid pooling: (h*w, H) merged tokens of one image -> (N, H) slots."""
        h, w = grid
        image = tokens.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)
        pooled = nn.functional.adaptive_avg_pool2d(image, (self.side, self.side))
        return pooled.flatten(2).squeeze(0).transpose(0, 1)

    def attend(self, visual_tokens, grids, images_per_sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention pooling: slots (B, N, H), attention weights (B, N, K) over each sample's K padded tokens, and
        the key padding mask (B, K) (True = padding)."""
        keys = [self.key_proj(self.key_norm(t)) + sincos_2d(g, self.config.attention_dim, t.device).to(t.dtype)
                for t, g in zip(visual_tokens, grids)]
        if self.image_embed is not None:  # image k of its question: + its index embedding (0 for the first)
            index = torch.cat([torch.arange(int(c)) for c in images_per_sample]).to(self.image_embed.device)
            table = image_index_embedding(self.image_embed, index, self.config.max_images)
            assert table is not None  # None only without a table, and image_embed is one
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
        scores = torch.einsum("nd,bkd->bnk", self.queries.to(key.dtype), key) / self.config.attention_dim ** 0.5
        weights = scores.masked_fill(padding[:, None], float("-inf")).softmax(-1)
        return weights @ value, weights, padding

    def forward(self, visual_tokens: list[torch.Tensor] | tuple[torch.Tensor, ...], grids: list[tuple[int, int]],
                images_per_sample: list[int]) -> torch.Tensor:
        """Per-image merged tokens (the vision tower's `pooler_output`) -> memory (B, N, H)."""
        check_image_counts(images_per_sample, len(visual_tokens))
        if self.config.pooling == "attention":
            x = self.attend(visual_tokens, grids, images_per_sample)[0]
        else:
            slots = [self.pool(t, g) for t, g in zip(visual_tokens, grids)]
            per_sample, start = [], 0
            for count in images_per_sample:
                per_sample.append(torch.stack(slots[start:start + count]).mean(0))
                start += count
            x = torch.stack(per_sample)
        return self.norm(self.mlp(x + self.slot_embed)) * self.gain
