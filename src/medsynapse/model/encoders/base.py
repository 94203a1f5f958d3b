"""The anatomical prior encoder interface (E_ana) shared by the tiny segmentation net and SAM-family encoders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn


@dataclass
class PriorOutput:
    """Prior tokens S (B, M, d_f) on a spatial grid (Hf, Wf) with M = Hf * Wf, and the region mask B (B, M).

    `region_mask` marks the encoder's highest-confidence diagnostic region: the tokens whose counterfactual removal
    (S ⊙ ¬B) is the Stage II intervention. It is never empty (`top_region`). `finding` (B,) says whether any token
    reached the encoder's threshold, i.e. whether the encoder found anything at all (the `reference` counterfactual's
    bank holds images without a finding); None where an encoder or an older cache does not give it.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    region_mask: torch.Tensor
    finding: torch.Tensor | None = None

    def select(self, index: torch.Tensor | list[int]) -> PriorOutput:
        finding = self.finding[index] if self.finding is not None else None
        return PriorOutput(self.tokens[index], self.grid, self.region_mask[index], finding)

    def to(self, device: torch.device | str) -> PriorOutput:
        finding = self.finding.to(device) if self.finding is not None else None
        return PriorOutput(self.tokens.to(device), self.grid, self.region_mask.to(device), finding)


class PriorEncoder(nn.Module, ABC):
    """Frozen image encoder that yields prior tokens and a region mask; always used under `torch.no_grad`."""

    feature_dim: int

    @abstractmethod
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> the encoder's input tensor (B, 3, H, W)."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> PriorOutput:
        """Input tensor -> prior tokens, grid and region mask."""

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> PriorOutput:
        device = next(self.parameters()).device
        return self.encode_pixels(self.preprocess(images).to(device))

    def region_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The diagnostic region at pixel level (B, H, W) bool, for the image-space counterfactual."""
        raise NotImplementedError(f"{type(self).__name__} gives no pixel-level region; use a token intervention "
                                  "(zero, drop, inpaint)")

    @torch.no_grad()
    def encode_counterfactual(self, images: list[Image.Image]) -> PriorOutput:
        """Prior tokens of the images with the region removed in pixel space (model/counterfactual.py, "pixels")."""
        from medsynapse.model.counterfactual import inpaint_pixels

        device = next(self.parameters()).device
        pixels = self.preprocess(images).to(device)
        return self.encode_pixels(inpaint_pixels(pixels, self.region_pixels(pixels)))


def top_region(cell_confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Region mask from per-token confidence (B, M): tokens at or above `threshold`, else the single best token.

    Never empty, so the counterfactual always removes the encoder's best evidence (an empty mask would make
    M' = M and the causal reward identically zero).
    """
    mask = cell_confidence >= threshold
    best = torch.zeros_like(mask)
    best.scatter_(1, cell_confidence.argmax(dim=1, keepdim=True), True)
    return torch.where(mask.any(dim=1, keepdim=True), mask, best)


def has_finding(cell_confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) bool: some token of the image reaches `threshold` (the encoder found something)."""
    return (cell_confidence >= threshold).any(dim=1)
