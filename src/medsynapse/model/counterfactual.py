"""Counterfactual prior tokens: remove the encoder's diagnostic region B from S before P_phi reads it (M' = P_phi(·)).

Three interventions:
- ``zero`` (the paper, literally S ⊙ ¬B). Leaks the region: a zeroed token passes P_phi's input LayerNorm
  (LN(0) = its bias) and gets its 2-D position added, so every removed token becomes the same recognisable vector at a
  known position, and M' still encodes where the region was and how big it is (measured: a linear probe reads the
  lesion's quadrant from M' as well as from M).
- ``drop``: the region's tokens are left out of P_phi's cross-attention. The hole still shows (attention renormalises
  over the remaining positions), and tokens at the region's edge keep evidence.
- ``inpaint``: the region is grown by ``dilation`` tokens (its edge tokens carry spill-over evidence
  below the mask threshold), then filled by harmonic interpolation from the surrounding tokens: each removed token is
  repeatedly set to the mean of its 4-neighbours while the kept tokens stay fixed (Jacobi iterations of Laplace's
  equation, started from the mean kept token). The filled tokens look like the tissue around them, sit at their
  usual positions. Measured on the demo (leak probe, eval/diagnostics.py): still leaks, a linear probe reads the
  lesion's quadrant from M' as well as from M (0.70 vs 0.67, chance 0.28), even with the ground-truth lesion mask as
  the region. A token-sized hole is conspicuous however it is filled: its size and smoothness give its place away.
- ``pixels``: the finding is removed from the *image* and the encoder runs again, S' = E_ana(inpaint(X, region)):
  the encoder's pixel-level region (grown by one pixel) is filled by the same harmonic interpolation from the
  surrounding pixels, so only the lesion's few pixels change and the tokens see ordinary tissue there. Needs the
  images and an encoder that gives a pixel-level region (`PriorEncoder.region_pixels`); used by evaluation and the
  diagnostics (`MedSynapseV.memory_for`), not yet by the Stage II recipe, which reads cached prior tokens.

Hand-written because no library inpaints a token grid in feature space; it is a few tensor operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERVENTIONS = ("zero", "drop", "inpaint", "pixels")
TOKEN_INTERVENTIONS = ("zero", "drop", "inpaint")  # act on the prior tokens; "pixels" re-encodes an edited image


def dilate_region(region: torch.Tensor, grid: tuple[int, int], steps: int) -> torch.Tensor:
    """(B, M) bool region on an (h, w) grid grown by `steps` tokens in the 8-neighbourhood."""
    if steps <= 0:
        return region
    h, w = grid
    image = region.view(-1, 1, h, w).float()
    grown = F.max_pool2d(image, kernel_size=2 * steps + 1, stride=1, padding=steps)
    return grown.view(region.shape) > 0.5


def harmonic_fill(tokens: torch.Tensor, grid: tuple[int, int], region: torch.Tensor,
                  iterations: int | None = None) -> torch.Tensor:
    """Tokens (B, M, d) with the `region` (B, M) tokens replaced by a harmonic interpolation of the kept ones.

    A sample whose region covers every token has nothing to interpolate from: its tokens become the mean token of the
    batch's kept tokens (or zeros when nothing is kept anywhere).
    """
    h, w = grid
    batch, _, dim = tokens.shape
    keep = (~region).to(tokens.dtype).unsqueeze(-1)  # (B, M, 1)
    kept_count = keep.sum(1, keepdim=True)
    mean_kept = (tokens * keep).sum(1, keepdim=True) / kept_count.clamp(min=1)
    if bool((kept_count == 0).any()):
        batch_mean = (tokens * keep).sum((0, 1), keepdim=True) / keep.sum().clamp(min=1)
        mean_kept = torch.where(kept_count > 0, mean_kept, batch_mean)
    filled = tokens * keep + mean_kept * (1 - keep)
    image = filled.transpose(1, 2).reshape(batch, dim, h, w)
    keep_image = keep.transpose(1, 2).reshape(batch, 1, h, w)
    original = image
    ones = torch.ones(1, 1, h, w, dtype=tokens.dtype, device=tokens.device)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=tokens.dtype,
                          device=tokens.device).view(1, 1, 3, 3)
    neighbours = F.conv2d(ones, kernel, padding=1)  # 2, 3 or 4 (edges and corners have fewer)
    for _ in range(iterations if iterations is not None else 2 * (h + w)):
        average = F.conv2d(image.reshape(batch * dim, 1, h, w), kernel, padding=1).view(batch, dim, h, w) / neighbours
        image = original * keep_image + average * (1 - keep_image)
    return image.reshape(batch, dim, h * w).transpose(1, 2)


def inpaint_pixels(pixels: torch.Tensor, region: torch.Tensor, dilation: int = 1, iterations: int = 64) -> torch.Tensor:
    """Images (B, C, H, W) with the `region` (B, H, W) pixels, grown by `dilation` pixels, filled harmonically."""
    batch, channels, h, w = pixels.shape
    grown = dilate_region(region.reshape(batch, h * w), (h, w), dilation)
    flat = pixels.permute(0, 2, 3, 1).reshape(batch, h * w, channels)
    filled = harmonic_fill(flat, (h, w), grown, iterations)
    return filled.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def counterfactual_tokens(tokens: torch.Tensor, grid: tuple[int, int], region: torch.Tensor, intervention: str,
                          dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens for P_phi, tokens to drop from its cross-attention or None) with the region removed.

    `dilation` applies to ``inpaint`` only; ``zero`` and ``drop`` use the encoder's region B as the paper defines it.
    """
    if intervention == "zero":
        return tokens * (~region).unsqueeze(-1).to(tokens.dtype), None
    if intervention == "drop":
        return tokens, region
    if intervention == "inpaint":
        return harmonic_fill(tokens, grid, dilate_region(region, grid, dilation)), None
    if intervention == "pixels":
        raise ValueError("the 'pixels' intervention edits the image and re-encodes it: use MedSynapseV.memory_for "
                         "(it needs the images), not the prior tokens alone")
    raise ValueError(f"unknown intervention {intervention!r}; expected one of {INTERVENTIONS}")
