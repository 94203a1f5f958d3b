"""Base-VLM preparation for the tiny demo model: full fine-tuning on the *general* SynthMed questions.

A random-weight tiny Qwen3-VL knows nothing; this step stands in for pre-training. It teaches the answer format
(yes/no, option letters, one-word answers, captions) and general image content (modality, region, organs), but never
shows a lesion question, so the lesion task is left for the memory to solve. Real Qwen3-VL checkpoints skip this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medsynapse.data.dataset import VQADataset
from medsynapse.data.schema import read_samples
from medsynapse.model.vlm import PromptBuilder, forward_with_memory, load_vlm
from medsynapse.recipes import trainer


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


def prepare_base(config: BasePrepConfig) -> Path:
    torch.manual_seed(config.seed)
    model, processor = load_vlm(config.vlm, dtype="float32")
    prompts = PromptBuilder(processor, n_memory=0)
    samples = [s for s in read_samples(config.train_file) if s.family in config.families]
    dataset = VQADataset(samples, prompts, with_answers=True)
    dataset.validate()
    model.train()
    optimizer = trainer.adamw(model, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, config.steps, config.warmup_ratio)
    bar = tqdm(range(config.steps), desc="base-prep")
    for step in bar:
        indices = trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed)
        batch = prompts.collate([dataset.encoded(i) for i in indices])
        loss = forward_with_memory(model, batch, None, prompts.latent_id, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    out = Path(config.output_dir)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out
