"""SFT control: LoRA on the VLM's language model with next-token loss on the answer tokens, and no memory.
With `target: rationale` it is CoT-SFT: the text learnt is the sample's reasoning steps, then the answer inside
<answer></answer>, to a prompt in the `reasoning` format; the saved folder records that format, so eval and predict
let it write its steps and read the tagged answer (the explicit-CoT row of the paper's efficiency argument).

The control for the memory stages: "a model that also learnt the answer format, without memory". It trains on the
same questions as Stage I / II (the same `families` / `answer_types` filters), with the same LoRA as Stage II
(`MedSynapseV.add_lora`, language-model projections only: the vision tower and every base weight stay frozen) and the
same answer loss as Stage I (`objectives.ntp.answer_nll`), on a plain VLM with no memory slots.

Per step, top to bottom:
1. the global batch for (seed, step), this rank's slice, collated with the answers (left-padded: answers at the end);
2. vision features once, without gradients (the vision tower has no LoRA);
3. one forward that keeps only the logits of the answer window (`logits_to_keep`: the full-sequence (B, T, V) logits
   of an 8B VLM would dominate memory), the answer loss, backward, clip, AdamW, cosine schedule;
4. checkpoints of the LoRA tensors + optimiser/scheduler/RNG for exact resume; TensorBoard logs (loss, lr, grad norm).

The saved folder names the base VLM and holds the adapter (no sampler, no encoder):
`MedSynapseV.from_pretrained(output, merge_adapter=True)` loads the VLM with the LoRA folded in and answers without
memory, like the base VLM does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from medsynapse.config import to_dict
from medsynapse.data.dataset import training_dataset
from medsynapse.model.bases import resolve_base
from medsynapse.model.medsynapse import MANIFEST, MedSynapseV
from medsynapse.model.vlm import PromptBatch, vision_features
from medsynapse.recipes import sharding, trainer
from medsynapse.recipes.config_base import Distributed, LoRAConfig, LossReduction, SFTTarget, TrainingConfig


@dataclass
class SFTConfig(TrainingConfig, LoRAConfig):
    model: str = ""  # a plain VLM folder, or any MedSynapse folder: only the base VLM it names is used
    output_dir: str = "runs/sft"
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_steps: int = 500  # 0: `epochs` decide
    epochs: float = 0.0  # passes over the training samples when max_steps is 0
    loss_reduction: LossReduction = "token"  # token | sample | sum (see objectives.ntp)
    # answer: learn the gold answer (SFT); rationale: learn the reasoning steps, then the answer in <answer></answer>,
    # to a prompt in the `reasoning` format (CoT-SFT: the explicit-CoT row; it decodes its steps at inference)
    target: SFTTarget = "answer"
    gradient_checkpointing: bool = False  # non-reentrant, on the VLM layers: less activation memory
    # ddp | fsdp: the VLM and its LoRA sharded over the ranks (recipes/sharding, as Stage II)
    distributed: Distributed = "ddp"


def base_vlm_path(folder: str | Path) -> str:
    """The VLM folder itself, or the base VLM a MedSynapse folder names (its sampler, encoder, A_psi and any adapter
    are not used: the control starts from the same base VLM as the memory stages)."""
    folder = Path(folder).expanduser()  # expanded here: the saved manifest records the path as given, resolved
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return str(folder)
    data = json.loads(manifest.read_text())
    vlm = resolve_base(data["vlm"], folder, "vlm")  # found by name and content hash (model/bases.py)
    if data.get("adapter"):
        warnings.warn(f"{folder}: its LoRA adapter is not used; SFT trains a fresh one on the base VLM {vlm}",
                      stacklevel=2)
    return cast(str, vlm)  # a manifest always names its VLM


def sft_loss(policy, batch: PromptBatch, latent_id: int, features=None, reduction: str = "token") -> torch.Tensor:
    """Answer-token next-token loss without memory (trainer.answer_loss)."""
    return trainer.answer_loss(policy, batch, None, latent_id, features, reduction)


@trainer.one_run_per_folder
def train_sft(config: SFTConfig, on_step: Callable[[int], None] | None = None) -> Path:
    trainer.check_steps(config.max_steps, minimum=0 if config.epochs > 0 else 1)  # before anything is loaded
    trainer.check_paths(config, ("model", "train_file"))
    sharding.check_distributed(config.distributed)
    trainer.check_positive(config, ("lora_r", "lora_alpha", "lr", "batch_size", "save_every", "log_every"))
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
    torch.manual_seed(config.seed)

    vlm_path = base_vlm_path(config.model)
    model = MedSynapseV.plain_with_lora(vlm_path, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        config.lora_targets, dtype=config.dtype)  # no memory slots; seeded init
    sharded = config.distributed == "fsdp" and accelerator.num_processes > 1
    if sharded:  # on the CPU (no rank holds the whole VLM on its device), before the optimizer
        sharding.shard_vlm(model.vlm, accelerator, record=output)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        trainer.enable_activation_checkpointing(model.vlm)

    if config.target not in ("answer", "rationale"):
        raise ValueError(f"target must be 'answer' (SFT) or 'rationale' (CoT-SFT), got {config.target!r}")
    model.answer_format = "reasoning" if config.target == "rationale" else "direct"
    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=True, answer_format=model.answer_format, target=config.target)

    total_steps = config.max_steps or max(1, round(config.epochs * len(dataset) / config.batch_size))
    optimizer = trainer.adamw(model.vlm, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    policy, optimizer, scheduler = sharding.prepare_policy(accelerator, model.vlm, optimizer, scheduler, sharded)
    unwrapped = accelerator.unwrap_model(policy)
    model.vlm = unwrapped

    start = 0
    checkpoint = trainer.resume_point(output, config, total_steps)
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint, unwrapped, optimizer, scheduler, sharded=sharded)["step"]
    accelerator.init_trackers("sft", config={k: str(v) for k, v in to_dict(config).items()})

    unwrapped.train()  # LoRA dropout (if any) on; Qwen3-VL's own dropout rates are 0
    bar = tqdm(range(start, total_steps), desc="sft", disable=not accelerator.is_main_process,
               initial=start, total=total_steps)
    for step in bar:
        indices = trainer.rank_slice(trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed),
                                     accelerator.process_index, accelerator.num_processes)
        batch = model.prompts.collate([dataset.encoded(i) for i in indices], with_answers=True).to(accelerator.device)
        with torch.no_grad():
            features = vision_features(unwrapped, batch)
        loss = sft_loss(policy, batch, model.latent_id, features, config.loss_reduction)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == total_steps - 1:
            logs = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        done = step + 1
        if done % config.save_every == 0 or done == total_steps:
            trainer.checkpoint(accelerator, output, done, unwrapped, optimizer, scheduler, sharded, config=config)
        if on_step is not None:
            on_step(done)

    accelerator.wait_for_everyone()
    adapter = sharding.adapter_state(unwrapped, sharded)
    if accelerator.is_main_process:
        unwrapped.eval()
        model.save_pretrained(output, adapter_state=adapter,
                              training=trainer.training_record(config, "cot-sft" if config.target == "rationale"
                                                               else "sft"))
    trainer.end_training(accelerator)
    return output
