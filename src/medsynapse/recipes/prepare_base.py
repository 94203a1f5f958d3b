"""Base-VLM preparation for the tiny demo model: full fine-tuning on the *general* SynthMed questions.

A random-weight tiny Qwen3-VL knows nothing; this step stands in for pre-training. It teaches the answer format
(yes/no, option letters, one-word answers, captions) and general image content (modality, region, organs), but never
shows a lesion question, so the lesion task is left for the memory to solve. Real Qwen3-VL checkpoints skip this step.

A real Qwen3-VL's vision tower comes from broad, partly grounded visual pre-training, and its tokens describe fine
image content, findings included, whether or not the language model was ever asked about them. Trained on the general
questions alone, the tiny tower keeps only what they need: a linear probe read lesion presence from its tokens at the
majority rate (0.63-0.68, majority 0.70), so no encoder-free student could learn presence from them. Measured
stand-ins for that pre-training (demo data, linear presence probe on the flattened merged tokens):
- a label-free pixel-reconstruction head on the merged tokens, trained jointly: 0.70-0.73 (a pixel code is
  polarity-dependent; bright and dark lesions point in opposite directions);
- a dense lesion-coverage head trained jointly with the language loss: 0.67-0.74;
- a vision pre-training phase (the tower alone, dense lesion-coverage head, positives up-weighted): 0.81 after 300
  steps; that is what `vision_steps` does, before the language phase, whose loss then keeps the head as an auxiliary
  term (`grounding_weight`) so the tower does not forget. The head predicts, *linearly* from each merged token, the
  lesion coverage of its window's 4x4 sub-cells (supervision from the SynthMed masks, as grounding data is part of
  real towers' pre-training) and is thrown away afterwards. The language model never sees a lesion question,
  caption or mask, so the base VLM still has no lesion *answers*. How readable the evidence ends up is measured by
  the readability probe of `medsynapse diagnose`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from medsynapse.data.dataset import VQADataset
from medsynapse.data.images import load_mask
from medsynapse.data.schema import Sample, read_samples
from medsynapse.locking import make_tree_readable
from medsynapse.model.vlm import PromptBuilder, core_vlm, forward_with_memory, load_vlm, vision_features
from medsynapse.recipes import trainer

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig

BASE_VERSION = 2  # bump when base preparation changes (2: vision pre-training with a lesion-coverage head)


@dataclass
class BasePrepConfig:
    vlm: str
    train_file: str
    output_dir: str
    families: tuple[str, ...] = ("general",)
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    seed: int = 0
    vision_steps: int = 0  # vision pre-training steps (tower + lesion-coverage head only); needs `mask` in the data
    vision_lr: float = 3e-3
    grounding_weight: float = 0.0  # the lesion-coverage loss kept as an auxiliary term in the language phase
    grounding_pos_weight: float = 5.0  # lesion cells are ~2 % of cells: up-weight them in the BCE


GROUNDING_CELLS = 4  # each merged token predicts the lesion coverage of a 4x4 grid of sub-cells of its window


def grounding_target(masks: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
    """Per image (H, W) float masks and merged-token grids -> (total merged tokens, 16) coverage fractions, in the
    merged tokens' row-major order."""
    rows = []
    for mask, (h, w) in zip(masks, grids):
        cells = torch.nn.functional.adaptive_avg_pool2d(mask[None, None], (h * GROUNDING_CELLS, w * GROUNDING_CELLS))
        windows = cells.view(h, GROUNDING_CELLS, w, GROUNDING_CELLS).permute(0, 2, 1, 3)
        rows.append(windows.reshape(h * w, GROUNDING_CELLS ** 2))
    return torch.cat(rows)


def load_masks(samples: list[Sample], train_file: str) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for sample in samples:
        if sample.mask is None:
            raise ValueError(f"{train_file}: record id {sample.id!r} has no field 'mask' (vision pre-training)")
        if sample.mask not in masks:
            masks[sample.mask] = torch.from_numpy(np.asarray(load_mask(sample.mask, sample)) > 127).float()
    return masks


def grounding_loss(model, head: torch.nn.Linear, batch, features, masks: list[torch.Tensor],
                   pos_weight: float) -> torch.Tensor:
    merge = model.config.vision_config.spatial_merge_size
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
    logits = head(torch.cat(list(features.pooler_output)))
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, grounding_target(masks, grids), pos_weight=torch.tensor(pos_weight))


def pretrain_vision(model, head: torch.nn.Linear, dataset: VQADataset, masks: dict[str, torch.Tensor],
                    config: BasePrepConfig) -> None:
    """The vision tower (and its merger) + the coverage head only, one image per sample, before any language."""
    params = [*core_vlm(model).model.visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, config.vision_steps, config.warmup_ratio)
    bar = tqdm(range(config.vision_steps), desc="base-prep vision")
    for step in bar:
        indices = trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed + 1)
        batch = dataset.prompts.collate([dataset.encoded(i) for i in indices])
        loss = grounding_loss(model, head, batch, vision_features(model, batch),
                              [masks[cast(str, dataset.samples[i].mask)] for i in indices], config.grounding_pos_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(grounding=f"{loss.item():.4f}")


def prepare_base(config: BasePrepConfig) -> Path:
    torch.manual_seed(config.seed)
    model, processor = load_vlm(config.vlm, dtype="float32")
    prompts = PromptBuilder(processor, n_memory=0)
    samples = [s for s in read_samples(config.train_file) if s.family in config.families]
    dataset = VQADataset(samples, prompts, with_answers=True)
    dataset.validate()
    head = torch.nn.Linear(cast("Qwen3VLTextConfig", model.config.text_config).hidden_size, GROUNDING_CELLS ** 2)
    grounded = config.vision_steps > 0 or config.grounding_weight > 0
    masks = load_masks(samples, config.train_file) if grounded else {}
    model.train()
    if config.vision_steps > 0:
        pretrain_vision(model, head, dataset, masks, config)
    optimizer = trainer.adamw(torch.nn.ModuleList([model, head]), config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, config.steps, config.warmup_ratio)
    bar = tqdm(range(config.steps), desc="base-prep")
    for step in bar:
        indices = trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed)
        batch = prompts.collate([dataset.encoded(i) for i in indices])
        features = vision_features(model, batch)
        loss = forward_with_memory(model, batch, None, prompts.latent_id, features=features, labels=batch.labels).loss
        auxiliary = torch.zeros(())
        if config.grounding_weight > 0:
            auxiliary = grounding_loss(model, head, batch, features,
                                       [masks[cast(str, samples[i].mask)] for i in indices],  # grounded: masked
                                       config.grounding_pos_weight)
        (loss + config.grounding_weight * auxiliary).backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", grounding=f"{auxiliary.item():.4f}")
    out = Path(config.output_dir)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    make_tree_readable(out)  # safetensors writes 0600: the umask's modes instead
    return out
