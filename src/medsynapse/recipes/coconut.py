"""Coconut† (Hao et al. 2024) on Qwen3-VL: continuous thoughts in place of the reasoning steps, by curriculum; with
`patches_per_step` > 0 it is IVT-LR† (Chen et al. 2025): each latent step also inserts the image tokens the latent
position attends to most at one decoder layer (model/latent.py, `ivt_latents`).

The paper's baseline row "adapted with identical backbone and training data". Mechanism (model/latent.py): after the
question come k latent slots; thought 1 is the last hidden state at the end of the question, thought j+1 the last
hidden state at slot j; then the text. Curriculum over stages s = 0 .. max_latent_stage: at stage s the first s
reasoning steps are replaced by k = s * thoughts_per_step thoughts and the model learns the remaining steps, then the
answer in <answer></answer> (the `reasoning` format's tag), with the loss on those tokens only (question and thought
positions carry none). Every sample of a stage gets the same k, also one with fewer steps than s (all of its steps
replaced), as the reference's `get_cot_latent_dataset` does for s <= max_latent_stage. Then, with `final_stage` (the
default), the reference's last phase (facebookresearch/coconut dataset.py, `scheduled_stage > max_latent_stage`;
run.py keeps training in it until `num_epochs`): stage max_latent_stage + 1, where EVERY reasoning step is dropped,
also those past max_latent_stage that stage max_latent_stage still writes, the prompt holds max_latent_stage * c
thoughts and only the tagged answer is learned; the thoughts a saved folder answers with (max_latent_stage * c) are
this phase's. Its thought count is the reference's `pad_latent_to_max: True` (both its configs): the other choice,
min(steps, max_latent_stage) * c per sample, is not offered, because a batch's slots end every row's prompt at the
same columns (left padding; `slot_start` in model/latent.py) and a saved folder answers with one k. The stages share
the budget evenly: max_latent_stage + 2 stages with the final phase (the reference gives it the epochs left after
stage max_latent_stage: 13 of GSM8k's 25, 15 of ProsQA's 50), max_latent_stage + 1 without. The optimiser and its
schedule restart at every stage (`reset_optimizer: True` in the reference configs, where it restarts every epoch
with a constant lr). Stage 0 is CoT-SFT.

No `<|start-latent|>` / `<|end-latent|>` markers around the thoughts (the reference adds both tokens, initialised
from "<<", and trains their embedding rows by full fine-tuning; labels -100 on them). Here: (1) the slots are
MedSynapse-V's memory positions, at the END of the prompt, which the shared loaders and splices rely on (PromptBuilder
appends the n_memory slots after the assistant header; `slot_start`, `with_slots`, `generate_with_memory` and the
eval / predict / serve paths find them there); an end marker after the slots would move the prompt's end and break
that layout for every latent baseline and the saved folders. (2) New tokens change the frozen VLM's tokenizer and
embedding matrix: with a LoRA on the attention projections their rows would never be trained (an untrained or "<<"
copy vector at both positions), and every saved folder would have to carry a resized embedding. (3) The start marker
is there already in effect: the slots always follow the chat template's fixed `<|im_start|>assistant` line; and the
reference's own Qwen-VL port, IVT-LR (FYYDCC/IVT-LR qwen_vl/qwenvl_run.py, `no_special_marker=True`; infer.py
appends the bare `<|latent|>` slots), trains and answers without them.

Adaptations, said plainly: a LoRA on the language model (the model section's, as every baseline here) instead of
full fine-tuning (8B); defaults c 2 and max_latent_stage 3 (the reference GSM8k config), lr 1e-5 and one epoch per
stage (its 1e-4 and 3 epochs scaled down for large pretrained models, as its maintainers advise, coconut#11). From a
run file the budget is Stage I's, split over the stages; the 8B config sets lr 1e-5, SynthMed's c 1 (2-3 step
chains). One process only for now (each step
runs several forwards of the DDP-wrapped model before one backward).

Per step, top to bottom: the stage of this step (a new stage builds a fresh optimiser and schedule); the global batch
for (seed, step); vision features without gradients; the k thoughts through the cached latent loop, with gradients;
the teacher-forced loss of the remaining steps + answer with the thoughts in their slots; backward, clip, AdamW;
checkpoints for exact resume (a checkpoint at a stage boundary resumes into a fresh optimiser, as the run would).
The saved folder holds the LoRA and records {"method": "coconut", "thoughts": max_latent_stage * c} (IVT-LR: the
slots, steps, patches and layer) and the `reasoning` format, so `eval` / `predict` run the latent loop and read the
tagged answer. IVT-LR's reference: K = 32 patches chosen by attention averaged over ALL layers (returned with
`output_attentions`, a (B, layers x heads, L, L) tensor); here one layer's attention through a hook (default the
middle layer), K per run file (SynthMed's images have 16 merged tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm

from medsynapse.answers import reasoning_target
from medsynapse.config import to_dict
from medsynapse.data.dataset import VQADataset, training_dataset, with_reasoning_targets
from medsynapse.data.schema import Sample
from medsynapse.model.latent import ivt_latents, latent_thoughts
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import PromptBuilder, core_vlm, vision_features
from medsynapse.recipes import sharding, trainer
from medsynapse.recipes.config_base import Distributed, LoRAConfig, LossReduction, TrainingConfig

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig


@dataclass
class CoconutConfig(TrainingConfig, LoRAConfig):
    model: str = ""  # the base VLM folder
    output_dir: str = "runs/coconut"
    thoughts_per_step: int = 2  # c: thoughts that replace one reasoning step (reference GSM8k config: 2)
    max_latent_stage: int = 3  # the last partial stage replaces this many steps (its thoughts: inference's)
    # the reference's final phase, stage max_latent_stage + 1: every step latent (max_latent_stage * c thoughts), only
    # the answer learned; the budget is split over max_latent_stage + 2 stages (+ 1 without it)
    final_stage: bool = True
    patches_per_step: int = 0  # IVT-LR: image tokens inserted per latent step (reference 32); 0 = Coconut
    selection_layer: int = -1  # IVT-LR: the decoder layer whose attention chooses them; -1 = the middle layer
    steps_per_stage: int = 0  # optimiser steps per stage; 0: epochs_per_stage decide
    epochs_per_stage: float = 1.0  # reference 3 (GPT-2); fewer for large pretrained models (coconut#11)
    lr: float = 1e-5  # reference 1e-4 (GPT-2); ~1e-5 for large pretrained models, as its maintainers advise
    warmup_ratio: float = 0.0
    loss_reduction: LossReduction = "token"
    # ddp: one process (several forwards before one backward: DDP refuses) | fsdp: the VLM and its LoRA sharded over
    # the ranks (recipes/sharding), which allows it
    distributed: Distributed = "ddp"


def n_stages(max_latent_stage: int, final_stage: bool = True) -> int:
    """The curriculum's stage count: 0 .. max_latent_stage, then the all-latent final phase when it is on."""
    return max_latent_stage + 1 + int(final_stage)


def stage_of(step: int, steps_per_stage: int, max_latent_stage: int, final_stage: bool = True) -> int:
    """The curriculum stage of a global optimiser step (stages 0 .. max_latent_stage, then max_latent_stage + 1 when
    the final phase is on; steps_per_stage each)."""
    return min(step // steps_per_stage, n_stages(max_latent_stage, final_stage) - 1)


def stage_thoughts(stage: int, max_latent_stage: int, thoughts_per_step: int) -> int:
    """The thoughts at a stage: s * c up to max_latent_stage; the final phase keeps max_latent_stage * c (the
    reference's pad_latent_to_max)."""
    return min(stage, max_latent_stage) * thoughts_per_step


def stage_samples(samples: list[Sample], stage: int, max_latent_stage: int) -> list[Sample]:
    """At stage s <= max_latent_stage the text to learn is the steps after the first s, then the tagged answer; in
    the final phase (s > max_latent_stage) the tagged answer alone (the reference skips every step there)."""
    def kept(rationale: list[str]) -> list[str]:
        return rationale[stage:] if stage <= max_latent_stage else []

    return [dataclasses.replace(s, answer=reasoning_target(kept(s.rationale), s.answer)) for s in samples]


def stage_dataset(plain: VQADataset, stage: int, config: CoconutConfig) -> VQADataset:
    """A stage's training set: its texts (`stage_samples`) behind its slots (`stage_thoughts`; IVT-LR: each latent
    step also holds patches_per_step slots), on the same decoded images as `plain`."""
    k = stage_thoughts(stage, config.max_latent_stage, config.thoughts_per_step)
    prompts = PromptBuilder(plain.prompts.processor, k * (1 + config.patches_per_step))
    return plain.derived(stage_samples(plain.samples, stage, config.max_latent_stage), prompts)


def _stage_optimizer(model: MedSynapseV, config: CoconutConfig, steps: int):
    optimizer = trainer.adamw(model.vlm, config.lr, config.weight_decay)
    return optimizer, trainer.cosine_schedule(optimizer, steps, config.warmup_ratio)


@trainer.one_run_per_folder
def train_coconut(config: CoconutConfig, on_step: Callable[[int], None] | None = None) -> Path:
    trainer.check_paths(config, ("model", "train_file"))
    trainer.check_positive(config, ("lora_r", "lora_alpha", "lr", "batch_size", "thoughts_per_step",
                                    "max_latent_stage", "save_every", "log_every"))
    if config.patches_per_step < 0:
        raise ValueError(f"patches_per_step must be >= 0, got {config.patches_per_step}")
    if config.steps_per_stage < 0 or (config.steps_per_stage == 0 and not config.epochs_per_stage > 0):
        raise ValueError("steps_per_stage must be >= 1, or 0 with epochs_per_stage > 0")
    sharding.check_distributed(config.distributed)
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
    sharded = config.distributed == "fsdp" and accelerator.num_processes > 1
    if sharded and config.patches_per_step:
        raise NotImplementedError(
            "IVT-LR with distributed: fsdp: its patch passes reach earlier passes' keys through the KV cache, a "
            "gradient path FSDP2's backward does not re-gather the LoRA for (measured: a freed shard at backward); "
            "train it in one process")
    if not sharded:
        trainer.require_one_process(accelerator, "Coconut", sharded_alternative=True)
    torch.manual_seed(config.seed)
    model = MedSynapseV.plain_with_lora(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        config.lora_targets, dtype=config.dtype)
    if sharded:  # on the CPU (no rank holds the whole VLM on its device), before the optimizers
        sharding.shard_vlm(model.vlm, accelerator, record=output)
    model.to(accelerator.device)

    plain = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                             with_answers=True, answer_format="reasoning")
    with_reasoning_targets(plain.samples, config.train_file)  # every sample needs its steps (names one that lacks)
    per_stage = config.steps_per_stage or max(1, round(config.epochs_per_stage * len(plain) / config.batch_size))
    total_steps = per_stage * n_stages(config.max_latent_stage, config.final_stage)
    datasets: dict[int, VQADataset] = {}

    per_latent = 1 + config.patches_per_step  # slots per latent step
    layers = cast("Qwen3VLTextConfig", core_vlm(model.vlm).config.text_config).num_hidden_layers
    layer = config.selection_layer if config.selection_layer >= 0 else layers // 2
    if layer >= layers:
        raise ValueError(f"selection_layer {layer} >= the VLM's {layers} decoder layers")

    def latents(prompt, k: int, features):
        if config.patches_per_step == 0:
            return latent_thoughts(model.vlm, prompt, k, model.latent_id, features)
        return ivt_latents(model.vlm, prompt, k, config.patches_per_step, layer, model.latent_id, features)[0]

    def dataset_for(stage: int) -> VQADataset:
        if stage not in datasets:
            datasets[stage] = stage_dataset(plain, stage, config)
        return datasets[stage]

    start = 0
    checkpoint = trainer.resume_point(output, config, total_steps)
    optimizer, scheduler = _stage_optimizer(model, config, per_stage)
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint, model.vlm, optimizer, scheduler, sharded=sharded)["step"]
        if start % per_stage == 0:  # the run would start a new stage here: a fresh optimiser
            optimizer, scheduler = _stage_optimizer(model, config, per_stage)
    accelerator.init_trackers("coconut", config={k: str(v) for k, v in to_dict(config).items()})

    model.vlm.train()
    bar = tqdm(range(start, total_steps), desc="coconut", disable=not accelerator.is_main_process, initial=start,
               total=total_steps)
    for step in bar:
        stage = stage_of(step, per_stage, config.max_latent_stage, config.final_stage)
        if step % per_stage == 0 and step != start:
            optimizer, scheduler = _stage_optimizer(model, config, per_stage)  # reset_optimizer, per stage
        dataset = dataset_for(stage)
        k = stage_thoughts(stage, config.max_latent_stage, config.thoughts_per_step)
        indices = trainer.rank_slice(trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed),
                                     accelerator.process_index, accelerator.num_processes)
        items = [dataset.encoded(i) for i in indices]
        batch = dataset.prompts.collate(items, with_answers=True).to(accelerator.device)
        with torch.no_grad():
            features = vision_features(model.vlm, batch)
        thoughts = None
        if k:
            prompt = dataset.prompts.collate(items, with_answers=False).to(accelerator.device)
            thoughts = latents(prompt, k, features)
        loss = trainer.answer_loss(model.vlm, batch, thoughts, model.latent_id, features, config.loss_reduction)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.vlm.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == total_steps - 1:
            logs = {"loss": loss.item(), "stage": stage, "thoughts": k, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm)}
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", stage=stage)
        done = step + 1
        if done % config.save_every == 0 or done == total_steps or done % per_stage == 0:
            trainer.checkpoint(accelerator, output, done, model.vlm, optimizer, scheduler, sharded, config=config)
        if on_step is not None:
            on_step(done)

    model.vlm.eval()
    # the last stage's thoughts (max_latent_stage * c, with or without the final phase): what the folder answers with
    steps = stage_thoughts(stage_of(total_steps - 1, per_stage, config.max_latent_stage, config.final_stage),
                           config.max_latent_stage, config.thoughts_per_step)
    model.latent = {"method": "coconut", "thoughts": steps}
    if config.patches_per_step:
        model.latent = {"method": "ivt-lr", "thoughts": steps * per_latent, "steps": steps,
                        "patches": config.patches_per_step, "layer": layer}
    model.answer_format = "reasoning"
    adapter = sharding.adapter_state(model.vlm, sharded)
    if accelerator.is_main_process:
        model.save_pretrained(output, adapter_state=adapter,
                              training=trainer.training_record(config, "ivt-lr" if config.patches_per_step
                                                               else "coconut"))
    accelerator.wait_for_everyone()
    trainer.end_training(accelerator)
    return output
