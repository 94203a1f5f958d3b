"""Train the tiny segmentation prior encoder on SynthMed masks, then freeze and save it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medsynapse.data.images import load_image, load_mask
from medsynapse.data.schema import read_samples
from medsynapse.model.encoders import TinySegConfig, TinySegEncoder


@dataclass
class EncoderTrainConfig:
    train_file: str
    output_dir: str
    image_size: int = 64
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    return (1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)).mean()


def load_mask_data(train_file: str, encoder: TinySegEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """One (image, mask) pair per distinct image of the file."""
    seen: dict[str, tuple] = {}
    for sample in read_samples(train_file):
        if sample.images[0] in seen:
            continue
        if sample.mask is None:
            raise ValueError(f"{train_file}: record id {sample.id!r} has no field 'mask' to train the encoder on")
        seen[sample.images[0]] = (load_image(sample.images[0], sample), load_mask(sample.mask, sample))
    images = encoder.preprocess([img for img, _ in seen.values()])
    size = encoder.config.image_size
    masks = torch.from_numpy(np.stack([np.asarray(m.resize((size, size))) > 127 for _, m in seen.values()]))
    return images, masks.float().unsqueeze(1)


def train_encoder(config: EncoderTrainConfig) -> tuple[Path, dict]:
    torch.manual_seed(config.seed)
    encoder = TinySegEncoder(TinySegConfig(image_size=config.image_size))
    images, masks = load_mask_data(config.train_file, encoder)
    n_val = max(1, len(images) // 10)
    train_x, train_y, val_x, val_y = images[n_val:], masks[n_val:], images[:n_val], masks[:n_val]
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    pos_weight = torch.tensor(10.0)  # lesions cover ~1 % of pixels
    encoder.train()
    bar = tqdm(range(config.steps), desc="encoder")
    for _ in bar:
        idx = torch.randint(len(train_x), (config.batch_size,), generator=generator)
        _, logits = encoder(train_x[idx])
        loss = F.binary_cross_entropy_with_logits(logits, train_y[idx], pos_weight=pos_weight)
        loss = loss + _dice_loss(logits, train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        _, logits = encoder(val_x)
        pred = (torch.sigmoid(logits) > 0.5).float()
        dice = float((2 * (pred * val_y).sum() + 1) / (pred.sum() + val_y.sum() + 1))
    out = Path(config.output_dir)
    encoder.save_pretrained(out)
    return out, {"val_dice": dice, "n_train_images": len(train_x), "n_val_images": n_val}
