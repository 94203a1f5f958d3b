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
  diagnostics (`MedSynapseV.memory_for`), not by the Stage II recipe, which reads cached prior tokens. Measured
  (leak probe, demo Stage II, seed 0, benchmarks/counterfactual_leak.py): 0.47 (chance 0.28): a fill cannot restore
  what crossed the hole (a body edge, an organ boundary, nuclei); even with the ground-truth lesion mask as the region
  the probe reads 0.50, against 0.19 for the scan's healthy twin (SynthMed's `render_scan(paint_lesions=False)`: the
  same scan drawn without its lesions).
- ``reference`` (recommended): M' is the memory of the nearest *reference* image, an image in which the encoder found
  nothing (`PriorOutput.finding` false), from a bank of such images' prior tokens saved with the model (built from the
  training set by Stages I-II); "nearest" = the smallest mean squared token distance over the tokens outside the
  region grown by ``dilation`` tokens, so the reference matches the image's anatomy and not its finding. An image
  without a finding is its own reference (nothing to remove: M' = M). M' is then the memory of a real image without
  the finding: nothing in it was edited, so nothing marks where the region was. Measured on the demo: the leak probe
  reads the lesion's quadrant from M' at 0.21 ± 0.02 over three seeds (chance 0.28; M 0.70), as from the healthy
  twin's memory.

Hand-written because no library inpaints a token grid in feature space; it is a few tensor operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERVENTIONS = ("zero", "drop", "inpaint", "pixels", "reference")
TOKEN_INTERVENTIONS = ("zero", "drop", "inpaint", "reference")  # act on prior tokens; "pixels" re-encodes an image


def dilate_region(region: torch.Tensor, grid: tuple[int, int], steps: int) -> torch.Tensor:
    """(B, M) bool region on an (h, w) grid grown by `steps` tokens in the 8-neighbourhood."""
    if steps <= 0:
        return region
    h, w = grid
    image = region.view(-1, 1, h, w).float()
    grown = F.max_pool2d(image, kernel_size=2 * steps + 1, stride=1, padding=steps)
    return grown.view(region.shape) > 0.5


def harmonic_fill(tokens: torch.Tensor, grid: tuple[int, int], region: torch.Tensor,
                  iterations: int | None = None, tolerance: float = 1e-4) -> torch.Tensor:
    """Tokens (B, M, d) with the `region` (B, M) tokens replaced by a harmonic interpolation of the kept ones.

    Jacobi iterations of Laplace's equation, started from the mean of the region's rim (the kept tokens touching it)
    and run until no filled value moves by more than `tolerance` relative to the data's scale (or for `iterations`
    when given). (It used to start from the image's mean and stop after 64 iterations, short of convergence for a
    lesion-sized hole in pixels.)
    A sample whose region covers every token has nothing to interpolate from: its tokens become the mean token of the
    batch's kept tokens (or zeros when nothing is kept anywhere).
    """
    h, w = grid
    batch, _, dim = tokens.shape
    keep = (~region).to(tokens.dtype).unsqueeze(-1)  # (B, M, 1)
    rim = (dilate_region(region, grid, 1) & ~region).to(tokens.dtype).unsqueeze(-1)
    start = (tokens * rim).sum(1, keepdim=True) / rim.sum(1, keepdim=True).clamp(min=1)
    kept_count = keep.sum(1, keepdim=True)
    if bool((kept_count == 0).any()):
        batch_mean = (tokens * keep).sum((0, 1), keepdim=True) / keep.sum().clamp(min=1)
        start = torch.where(kept_count > 0, start, batch_mean)
    filled = tokens * keep + start * (1 - keep)
    image = filled.transpose(1, 2).reshape(batch, dim, h, w)
    keep_image = keep.transpose(1, 2).reshape(batch, 1, h, w)
    original = image
    ones = torch.ones(1, 1, h, w, dtype=tokens.dtype, device=tokens.device)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=tokens.dtype,
                          device=tokens.device).view(1, 1, 3, 3)
    neighbours = F.conv2d(ones, kernel, padding=1)  # 2, 3 or 4 (edges and corners have fewer)
    scale = float(tokens.detach().abs().amax()) if tokens.numel() else 0.0
    limit = iterations if iterations is not None else 4 * h * w
    for step in range(limit):
        average = F.conv2d(image.reshape(batch * dim, 1, h, w), kernel, padding=1).view(batch, dim, h, w) / neighbours
        updated = original * keep_image + average * (1 - keep_image)
        if iterations is None and step % 16 == 15 and float((updated - image).abs().amax()) <= tolerance * scale:
            image = updated
            break
        image = updated
    return image.reshape(batch, dim, h * w).transpose(1, 2)


def inpaint_pixels(pixels: torch.Tensor, region: torch.Tensor, dilation: int = 1,
                   iterations: int | None = None) -> torch.Tensor:
    """Images (B, C, H, W) with the `region` (B, H, W) pixels, grown by `dilation` pixels, filled harmonically."""
    batch, channels, h, w = pixels.shape
    grown = dilate_region(region.reshape(batch, h * w), (h, w), dilation)
    flat = pixels.permute(0, 2, 3, 1).reshape(batch, h * w, channels)
    filled = harmonic_fill(flat, (h, w), grown, iterations)
    return filled.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def reference_bank(tokens: torch.Tensor, finding: torch.Tensor | None, size: int) -> torch.Tensor:
    """(K, M, d) prior tokens of up to `size` images without a finding, evenly spaced over the table's order.

    Raises when the table says nothing about findings or holds no image without one: a bank of images *with*
    findings would make M' carry findings too.
    """
    if finding is None:
        raise ValueError("the prior encoder gave no per-image finding flag, so no reference bank can be built; use "
                         "another counterfactual intervention (zero, drop, inpaint)")
    healthy = torch.nonzero(~finding.bool()).flatten()
    if healthy.numel() == 0:
        raise ValueError("no training image is free of findings by the prior encoder's threshold, so the reference "
                         "bank would be empty; lower the encoder's threshold or use another intervention")
    if size < 1:
        raise ValueError(f"reference_bank_size must be at least 1, got {size}")
    if healthy.numel() > size:
        healthy = healthy[torch.linspace(0, healthy.numel() - 1, size).round().long()]
    return tokens[healthy].detach().clone()


def nearest_reference(tokens: torch.Tensor, grid: tuple[int, int], region: torch.Tensor,
                      finding: torch.Tensor | None, bank: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """Tokens (B, M, d): each image with a finding replaced by its nearest bank entry (mean squared distance over
    the tokens outside the region grown by `dilation`), each image without one kept as it is.

    Distances as |a|² + |r|² - 2 a·r over the kept tokens, so no (B, K, M, d) tensor is ever built (a SAM token map
    is 4,096 x 256 per image).
    """
    bank = bank.to(device=tokens.device, dtype=tokens.dtype)
    keep = (~dilate_region(region, grid, dilation)).to(tokens.dtype)  # (B, M)
    kept = tokens * keep.unsqueeze(-1)
    cross = kept.flatten(1) @ bank.flatten(1).T  # (B, K)
    bank_norms = keep @ bank.pow(2).sum(-1).T  # (B, K): |r|² over each image's kept tokens
    own_norms = kept.pow(2).sum((1, 2)).unsqueeze(1)  # (B, 1)
    distance = own_norms + bank_norms - 2 * cross
    replaced = bank[distance.argmin(dim=1)]
    if finding is None:
        return replaced
    return torch.where(finding.bool().view(-1, 1, 1), replaced, tokens)


def counterfactual_tokens(tokens: torch.Tensor, grid: tuple[int, int], region: torch.Tensor, intervention: str,
                          dilation: int = 1, finding: torch.Tensor | None = None,
                          bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens for P_phi, tokens to drop from its cross-attention or None) with the region removed.

    `dilation` applies to ``inpaint`` and ``reference``; ``zero`` and ``drop`` use the encoder's region B as the paper
    defines it. ``reference`` needs the `bank` (`reference_bank`) and uses `finding` (None: every image has one).
    """
    if intervention == "zero":
        return tokens * (~region).unsqueeze(-1).to(tokens.dtype), None
    if intervention == "drop":
        return tokens, region
    if intervention == "inpaint":
        return harmonic_fill(tokens, grid, dilate_region(region, grid, dilation)), None
    if intervention == "reference":
        if bank is None:
            raise ValueError("the 'reference' counterfactual needs a bank of prior tokens of images without a finding "
                             "(reference_bank.safetensors, saved with the model by Stages I-II); this model has none: "
                             "use zero, drop or inpaint, or retrain Stage I with this version")
        return nearest_reference(tokens, grid, region, finding, bank, dilation), None
    if intervention == "pixels":
        raise ValueError("the 'pixels' intervention edits the image and re-encodes it: use MedSynapseV.memory_for "
                         "(it needs the images), not the prior tokens alone")
    raise ValueError(f"unknown intervention {intervention!r}; expected one of {INTERVENTIONS}")
