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

    def to_dict(self) -> dict:
        return asdict(self)


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

    def forward(self, probes: torch.Tensor, context: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_self(probes)
        probes = probes + self.self_attn(x, x, x, need_weights=False)[0]
        kv = self.norm_kv(context)
        probes = probes + self.cross_attn(self.norm_q(probes), kv, kv, key_padding_mask=drop, need_weights=False)[0]
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

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, M, d_f) -> memory (B, N, H). `drop` (B, M) True = token removed from cross-attention."""
        if drop is not None:
            # A row with every token dropped would attend to nothing (NaN); keep it whole, i.e. fall back to zeroing.
            drop = drop & ~drop.all(dim=1, keepdim=True)
        # Both terms are learnt projections, so neither the positions nor the content swamps the other at init.
        pos = self.pos_proj(sincos_2d(grid, self.config.width, tokens.device).to(tokens.dtype))
        context = self.input_proj(self.input_norm(tokens)) + pos
        probes = self.probes.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            probes = block(probes, context, drop)
        out = self.out_proj(self.out_norm(probes))
        rms = out.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return out * rms * self.gain


def embedding_rms(embedding: nn.Embedding) -> float:
    """RMS of the VLM's input-embedding rows, the scale memory vectors should sit at."""
    weight = embedding.weight.detach().float()
    return float(weight.pow(2).mean(-1).sqrt().mean()) if weight.numel() else 1.0


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class AutonomousConfig:
    hidden_size: int  # the VLM's text hidden size: merged visual tokens and memory vectors both live there
    n_memory: int = 16
    mlp_hidden: int = 0  # 0 = hidden_size (2 x H^2 weights: 33.6 M at Qwen3-VL-8B's H = 4096)
    embed_rms: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class AutonomousMemoryModule(nn.Module):
    """A_psi: memory from the VLM's own merged visual tokens, so inference needs no prior encoder and no sampler.

    Pooling: adaptive average pooling of each image's merged token grid to a sqrt(N) x sqrt(N) grid, one slot per
    cell, plus a learned per-slot embedding. Chosen because it has no parameters, keeps the 2-D layout (slot k always
    looks at the same part of the image, as the prior tokens' positions did for P_phi), and handles any resolution;
    attention pooling would add ~2 H^2 parameters. Each slot then goes through a 2-layer MLP + LayerNorm and the same
    learnable gain (initialised to the embedding RMS) as P_phi. Several images of one sample: their slots are averaged.
    """

    def __init__(self, config: AutonomousConfig):
        super().__init__()
        side = int(round(config.n_memory ** 0.5))
        if side * side != config.n_memory:
            raise ValueError(f"n_memory must be a square number for spatial pooling, got {config.n_memory}")
        self.config = config
        self.side = side
        hidden, inner = config.hidden_size, config.mlp_hidden or config.hidden_size
        self.slot_embed = nn.Parameter(torch.zeros(config.n_memory, hidden))
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.gain = nn.Parameter(torch.tensor(float(config.embed_rms)))

    def pool(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(h*w, H) merged tokens of one image -> (N, H) slots."""
        h, w = grid
        image = tokens.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)
        pooled = nn.functional.adaptive_avg_pool2d(image, (self.side, self.side))
        return pooled.flatten(2).squeeze(0).transpose(0, 1)

    def forward(self, visual_tokens: list[torch.Tensor] | tuple[torch.Tensor, ...], grids: list[tuple[int, int]],
                images_per_sample: list[int]) -> torch.Tensor:
        """Per-image merged tokens (the vision tower's `pooler_output`) -> memory (B, N, H)."""
        slots = [self.pool(t, g) for t, g in zip(visual_tokens, grids)]
        per_sample, start = [], 0
        for count in images_per_sample:
            per_sample.append(torch.stack(slots[start:start + count]).mean(0))
            start += count
        x = torch.stack(per_sample) + self.slot_embed
        return self.norm(self.mlp(x)) * self.gain
