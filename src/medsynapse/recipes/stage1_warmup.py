"""Stage I, Meta-Query Prior Memorization: train only P_phi with next-token loss on the answer tokens.

The VLM and the prior encoder are frozen. Prior features are computed once per image and reused every epoch.
Reads top to bottom: config -> model -> data -> optimiser -> (resume) -> loop -> save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm

from medsynapse.config import to_dict
from medsynapse.data.dataset import check_image_limit, training_dataset
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.objectives.ntp import answer_nll
from medsynapse.recipes import sharding, trainer
from medsynapse.recipes.config_base import Distributed, LossReduction, TrainingConfig
from medsynapse.recipes.priors import attach_reference_bank, prior_table, select_priors

if TYPE_CHECKING:
    from medsynapse.model.encoders import PriorEncoder
    from medsynapse.model.memory import DiagnosticMemorySampler


@dataclass
class Stage1Config(TrainingConfig):
    vlm: str = ""
    encoder: str = ""
    output_dir: str = "runs/stage1"
    n_memory: int = 16
    sampler_width: int = 256
    sampler_layers: int = 2
    sampler_heads: int = 4
    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    loss_reduction: LossReduction = "token"  # token | sample | sum (see objectives.ntp)
    gradient_checkpointing: bool = False  # non-reentrant, on the VLM layers: less activation memory
    prior_cache: str = ""  # folder of `medsynapse cache-features` shards; read when present, filled when missing
    reference_bank_size: int = 256  # training images without a finding kept for the `reference` counterfactual
    # ddp: every rank holds the VLM | fsdp: the VLM sharded over the ranks (recipes/sharding)
    distributed: Distributed = "ddp"
    max_images: int = 1  # images per question P_phi tells apart by an image-index embedding (model/memory.py)


@trainer.one_run_per_folder
def train_stage1(config: Stage1Config, on_step: Callable[[int], None] | None = None) -> Path:
    trainer.check_steps(config.max_steps, minimum=0)  # before anything is loaded
    trainer.check_paths(config, ("vlm", "encoder", "train_file"))
    sharding.check_distributed(config.distributed)
    trainer.check_positive(config, ("n_memory", "sampler_width", "sampler_layers", "sampler_heads", "lr",
                                    "batch_size", "save_every", "log_every", "reference_bank_size", "max_images"))
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
    torch.manual_seed(config.seed)

    model = MedSynapseV.build(config.vlm, config.encoder, n_memory=config.n_memory, width=config.sampler_width,
                              layers=config.sampler_layers, heads=config.sampler_heads, seed=config.seed,
                              dtype=config.dtype, max_images=config.max_images)
    model.vlm.requires_grad_(False).eval()
    if config.distributed == "fsdp":  # on the CPU (no rank holds the whole VLM on its device); P_phi stays DDP
        sharding.shard_vlm(model.vlm, accelerator, record=output)
    model.vlm.to(accelerator.device)
    if config.gradient_checkpointing:
        trainer.enable_activation_checkpointing(model.vlm)
        trainer.train_without_dropout(model.vlm)  # transformers only checkpoints in train mode
    cast("PriorEncoder", model.encoder).to(accelerator.device)  # built from config.encoder (check_paths requires it)

    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=True)
    check_image_limit(dataset.samples, model.max_images, config.train_file)
    priors, prior_row = prior_table(model.prior, model.encoder_path, dataset, cache_dir=config.prior_cache)
    attach_reference_bank(model, priors, config.reference_bank_size, required=False)

    total_steps = config.max_steps or max(1, round(config.epochs * len(dataset) / config.batch_size))
    sampler = cast("DiagnosticMemorySampler", model.sampler).train()  # built with the encoder
    optimizer = trainer.adamw(sampler, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    wrapped, optimizer, scheduler = accelerator.prepare(sampler, optimizer, scheduler)

    start = 0
    checkpoint = trainer.resume_point(output, config, total_steps)
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint, accelerator.unwrap_model(wrapped), optimizer, scheduler)["step"]
    accelerator.init_trackers("stage1", config={k: str(v) for k, v in to_dict(config).items()})

    bar = tqdm(range(start, total_steps), desc="stage1", disable=not accelerator.is_main_process,
               initial=start, total=total_steps)
    for step in bar:
        indices = trainer.rank_slice(trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed),
                                     accelerator.process_index, accelerator.num_processes)
        batch = model.prompts.collate([dataset.encoded(i) for i in indices]).to(accelerator.device)
        prior, counts = select_priors(priors, prior_row, indices)
        memory = wrapped(prior.tokens.to(accelerator.device), prior.grid, images_per_sample=counts)
        logits = model.forward(batch, memory, labels=None).logits
        loss = answer_nll(logits, cast(torch.Tensor, batch.labels), config.loss_reduction)  # collated with answers
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == total_steps - 1:
            logs = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        done = step + 1
        if accelerator.is_main_process and (done % config.save_every == 0 or done == total_steps):
            trainer.save_checkpoint(output, done, accelerator.unwrap_model(wrapped), optimizer, scheduler,
                                    config=config)
        if on_step is not None:
            on_step(done)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.sampler = accelerator.unwrap_model(wrapped)
        model.save_pretrained(output, training=trainer.training_record(config, "stage1"))
    trainer.end_training(accelerator)
    return output
