"""A_psi's grid pooling checked by value: a non-square token grid (rows and columns cannot be swapped unnoticed) and
a sample with several images (their pooled slots are averaged)."""

from __future__ import annotations

import torch
from torch import nn

from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule


def _pooling_only(hidden: int = 3) -> AutonomousMemoryModule:
    """Grid A_psi whose MLP, LayerNorm and gain are identities: forward returns the pooled slots themselves."""
    module = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=4, pooling="grid"))
    module.mlp, module.norm = nn.Identity(), nn.Identity()
    with torch.no_grad():
        module.gain.fill_(1.0)
    return module


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    """(h*w, 3) merged tokens in row-major order; token (y, x) holds [y, x, noise]."""
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    noise = torch.randn(h, w, generator=torch.Generator().manual_seed(seed))
    return torch.stack([ys, xs, noise], -1).view(h * w, 3)


def _slots(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """2 x 2 slots written out: slot k = (row k // 2, column k % 2) is the mean of its h/2 x w/2 block."""
    grid = tokens.view(h, w, -1)
    return torch.stack([grid[r * h // 2:(r + 1) * h // 2, c * w // 2:(c + 1) * w // 2].mean((0, 1))
                        for r in range(2) for c in range(2)])


def test_grid_pooling_of_a_non_square_grid_by_value():
    module = _pooling_only()
    tokens = _image(4, 6, seed=0)
    expected = _slots(tokens, 4, 6)
    # slot 1 is the top-right block: rows 0-1 (mean 0.5), columns 3-5 (mean 4)
    assert expected[1, :2].tolist() == [0.5, 4.0]
    torch.testing.assert_close(module.pool(tokens, (4, 6)), expected)
    torch.testing.assert_close(module([tokens], [(4, 6)], [1])[0], expected)


def test_grid_pooling_averages_a_samples_images_by_value():
    module = _pooling_only()
    first, second, alone = _image(4, 6, seed=1), _image(6, 4, seed=2), _image(2, 2, seed=3)
    out = module([first, second, alone], [(4, 6), (6, 4), (2, 2)], [2, 1])
    torch.testing.assert_close(out[0], (_slots(first, 4, 6) + _slots(second, 6, 4)) / 2)
    torch.testing.assert_close(out[1], alone)  # a 2 x 2 grid is its own 4 slots
    assert (out[0] - _slots(first, 4, 6)).abs().max() > 0.1  # the second image counts
