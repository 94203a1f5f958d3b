"""Stage III, Intrinsic Memory Transition: distil the privileged memory path into A_psi (paper Eq. 7-8).

Teacher = VLM + Stage II LoRA + memory P_phi(E_ana(X)); student = the same VLM + LoRA + memory A_psi(the VLM's own
merged visual tokens). Per step: one on-policy trajectory per sample from the student (`trajectories: teacher`: from
the teacher instead, the off-policy ablation); the generalized JSD_β between
the two branches' full-vocabulary next-token distributions at every trajectory position (token-weighted mean over
the batch, as TRL's "batchmean"); only A_psi is updated (teacher under no_grad; LoRA frozen but active in both).
Vision features and prior features are computed once per step and shared by generation and both branches.
With `engine: vllm` the trajectories come from a colocated vLLM engine given this step's memory rows (the VLM and its
LoRA are frozen here, so its weights are loaded once); the JSD is still computed on the training model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm

from medsynapse.answers import check_answer_format
from medsynapse.config import to_dict
from medsynapse.data.dataset import check_image_limit, training_dataset
from medsynapse.engines import Engine, check_engine
from medsynapse.locking import write_text_atomic
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule, embedding_rms
from medsynapse.model.sampling import row_keys, sampling_kwargs
from medsynapse.model.vlm import completion_logprobs, completion_mask, completion_outputs, core_vlm, vision_features
from medsynapse.objectives.alignment import memory_alignment_loss
from medsynapse.objectives.jsd import first_positions, generalized_jsd, generalized_jsd_from_hidden
from medsynapse.recipes import sharding, trainer
from medsynapse.recipes.config_base import (
    AnswerFormat,
    Distributed,
    JSDPositions,
    Pooling,
    RolloutSampling,
    TrainingConfig,
    Trajectories,
)
from medsynapse.recipes.engine_rollouts import engine_logprob_gap, rollouts_from_engine, start_engine
from medsynapse.recipes.priors import prior_table, select_priors

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig, Qwen3VLVisionConfig

TRAJECTORIES = ("student", "teacher")


@dataclass
class Stage3Config(TrainingConfig):
    model: str = ""  # a Stage II folder (VLM + LoRA + sampler + encoder)
    output_dir: str = "runs/stage3"
    mlp_hidden: int = 0  # 0 = the VLM hidden size (paper: 2-layer MLP at width 4096)
    pooling: Pooling = "attention"  # A_psi's pooling of the visual tokens: attention (content-selective) | grid
    attention_dim: int = 256
    max_steps: int = 300  # > 0: this many steps; 0: `epochs` passes over the data (one on-policy trajectory per sample
    # per step, as in the paper)
    epochs: float = 0.0
    beta: float = 0.5
    # whose trajectories the JSD is taken on: student (on-policy, the paper: y ~ pi^-, with A_psi's memory) | teacher
    # (off-policy: sequences sampled with the privileged memory M_pri, the distillation ablation)
    trajectories: Trajectories = "student"
    jsd_temperature: float = 1.0  # separate from the sampling temperature (one value served both in the reference)
    sample_temperature: float = 1.0
    top_p: float = 0.95
    rollout_sampling: RolloutSampling = "keyed"  # keyed: world-size invariant draws (model/sampling.py) | torch
    max_new_tokens: int = 16
    fused_jsd: bool = False  # True: JSD from hidden states + lm_head chunk by chunk (no full logits)
    jsd_chunk_size: int = 32
    answer_types: list[str] = field(default_factory=lambda: ["yes_no", "multiple_choice", "open"])
    gradient_checkpointing: bool = False  # non-reentrant, on the VLM layers: less activation memory
    memory_alignment: float = 0.0  # weight of ||M_auto − M_pri||² / ||M_pri||² added to the JSD
    # (objectives/alignment.py); 0 = the paper's IMT (JSD only)
    # Remedies for the student's gap (docs/results.md, "Where the memory helps"; each off by default, each a study row):
    # which trajectory positions the JSD averages over: all (the paper) | first (the answer's first token, the one
    # that decides a short answer; an end-of-sequence position otherwise weighs as much as the decision)
    jsd_positions: JSDPositions = "all"
    # > 0: after the distillation, this many steps adapt the Stage II LoRA to A_psi's memory (next-token loss on the
    # training answers with M_auto in the slots, A_psi frozen, lr `adapt_lr`, the same batch): the LoRA was trained
    # with the teacher's memory only. 0: the LoRA stays the teacher's (the paper). One process.
    adapt_steps: int = 0
    adapt_lr: float = 1e-4
    answer_format: AnswerFormat = "direct"  # direct | reasoning: prompts ask for an analysis then <answer></answer>
    prior_cache: str = ""  # folder of `medsynapse cache-features` shards; read when present, filled when missing
    # ddp: every rank holds the VLM | fsdp: the VLM sharded over the ranks (recipes/sharding)
    distributed: Distributed = "ddp"
    # hf: transformers' generate | vllm: trajectories from a vLLM engine (needs .venv-vllm, one process) given each
    # step's memory; draws are vLLM's, seeded per sample from the same keys (docs/vllm.md)
    engine: Engine = "hf"


@trainer.one_run_per_folder
def train_stage3(config: Stage3Config, on_step: Callable[[int], None] | None = None) -> Path:
    check_answer_format(config.answer_format)
    check_engine(config.engine)
    if not (math.isfinite(config.epochs) and config.epochs >= 0):
        raise ValueError(f"epochs must be a finite number >= 0, got {config.epochs}")
    trainer.check_steps(config.max_steps, minimum=0 if config.epochs > 0 else 1)  # before anything is loaded
    trainer.check_paths(config, ("model", "train_file"))
    trainer.check_positive(config, ("lr", "batch_size", "max_new_tokens", "save_every", "log_every"))
    sharding.check_distributed(config.distributed)
    if config.trajectories not in TRAJECTORIES:
        raise ValueError(f"unknown trajectories {config.trajectories!r}; expected one of {TRAJECTORIES}")
    if not (math.isfinite(config.memory_alignment) and config.memory_alignment >= 0):
        raise ValueError(f"memory_alignment must be a finite number >= 0, got {config.memory_alignment}")
    if config.adapt_steps < 0 or not (math.isfinite(config.adapt_lr) and config.adapt_lr > 0):
        raise ValueError(f"adapt_steps must be >= 0 and adapt_lr a finite number > 0, got {config.adapt_steps} and "
                         f"{config.adapt_lr}")
    output = Path(config.output_dir)
    accelerator = trainer.make_accelerator(output, config.report_to)
    if config.adapt_steps:
        trainer.require_one_process(accelerator, "Stage III's LoRA adaptation (adapt_steps)")
    torch.manual_seed(config.seed)

    model = MedSynapseV.from_pretrained(config.model, dtype=config.dtype)
    if model.sampler is None or model.encoder is None:
        raise ValueError(f"{config.model}: Stage III needs the teacher's sampler and encoder (a Stage II folder)")
    model.vlm.requires_grad_(False).eval()
    model.sampler.requires_grad_(False).eval()
    vlm_core = core_vlm(model.vlm)
    # A_psi tells a question's images apart as the teacher's P_phi does
    model.autonomous = AutonomousMemoryModule(AutonomousConfig(
        hidden_size=cast("Qwen3VLTextConfig", vlm_core.config.text_config).hidden_size, n_memory=model.n_memory,
        mlp_hidden=config.mlp_hidden,
        embed_rms=embedding_rms(cast(torch.nn.Embedding, vlm_core.get_input_embeddings())), pooling=config.pooling,
        attention_dim=config.attention_dim, max_images=model.sampler.config.max_images))
    sharded = config.distributed == "fsdp" and accelerator.num_processes > 1
    if sharded:  # on the CPU (no rank holds the whole VLM on its device); A_psi stays replicated
        sharding.shard_vlm(model.vlm, accelerator, record=output)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        trainer.enable_activation_checkpointing(model.vlm)

    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=False, answer_format=config.answer_format)
    check_image_limit(dataset.samples, model.max_images, config.train_file)
    priors, prior_row = prior_table(model.prior, model.encoder_path, dataset,
                                                      cache_dir=config.prior_cache)

    total_steps = config.max_steps or max(1, round(config.epochs * len(dataset) / config.batch_size))
    optimizer = trainer.adamw(model.autonomous, config.lr, config.weight_decay)
    scheduler = trainer.cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    student, optimizer, scheduler = accelerator.prepare(model.autonomous.train(), optimizer, scheduler)

    start = 0
    checkpoint = trainer.resume_point(output, config, total_steps)
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint, accelerator.unwrap_model(student), optimizer, scheduler)["step"]
    engine = start_engine(config.engine, model, config.seed, output, accelerator.num_processes)
    gaps: list[float] = []
    accelerator.init_trackers("stage3", config={k: str(v) for k, v in to_dict(config).items()})
    # the fused JSD applies lm_head chunk by chunk (gathered whole once when sharded: every rank takes part)
    lm_head = sharding.full_weight(vlm_core.lm_head) if config.fused_jsd else None

    bar = tqdm(range(start, total_steps), desc="stage3", disable=not accelerator.is_main_process,
               initial=start, total=total_steps)
    for step in bar:
        indices = trainer.rank_slice(trainer.global_batch_indices(len(dataset), config.batch_size, step, config.seed),
                                     accelerator.process_index, accelerator.num_processes)
        batch = model.prompts.collate([dataset.encoded(i) for i in indices], with_answers=False)
        batch = batch.to(accelerator.device)
        prior, counts = select_priors(priors, prior_row, indices)
        with torch.no_grad():
            features = vision_features(model.vlm, batch)
            teacher_memory = model.sampler(prior.tokens.to(accelerator.device), prior.grid, images_per_sample=counts)

        merge = cast("Qwen3VLVisionConfig", vlm_core.config.vision_config).spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
        student_memory = student(features.pooler_output, grids, batch.images_per_sample)

        gen_start = time.perf_counter()
        keys = row_keys(config.seed, step, trainer.global_positions(config.batch_size, accelerator.process_index,
                                                                    accelerator.num_processes))
        rollout_memory = student_memory.detach() if config.trajectories == "student" else teacher_memory
        if engine is not None:
            drawn = rollouts_from_engine(engine, model, dataset, indices, rollout_memory, 1, config.max_new_tokens,
                                         config.sample_temperature, config.top_p, keys)
            tokens, mask = drawn.tokens.to(accelerator.device), drawn.mask.to(accelerator.device)
            with torch.no_grad():  # did the engine sample the model the JSD is taken on, with this memory?
                sampled = completion_logprobs(model.vlm, batch, rollout_memory, tokens, mask, model.latent_id,
                                              features)
            gaps.append(engine_logprob_gap(cast(torch.Tensor, drawn.engine_logprobs), sampled, mask))
        else:
            tokens = model.generate(batch, rollout_memory, max_new_tokens=config.max_new_tokens,
                                    features=features, **sampling_kwargs(keys, config.rollout_sampling,
                                                                         config.sample_temperature, config.top_p))
            mask = completion_mask(tokens, model.prompts.eos_id)
        if config.jsd_positions == "first":
            mask = first_positions(mask)
        gen_seconds = time.perf_counter() - gen_start
        # Mean over the GLOBAL valid positions: DDP averages gradients over ranks, so each rank divides its sum by
        # (global count / world); a per-rank mean would weight ranks with fewer tokens more.
        num_items = max(accelerator.reduce(mask.sum().float(), "sum").item() / accelerator.num_processes, 1.0)

        with torch.no_grad():
            teacher_out = completion_outputs(model.vlm, batch, teacher_memory, tokens, mask, model.latent_id,
                                             features, hidden=config.fused_jsd)
        if config.gradient_checkpointing:
            trainer.train_without_dropout(model.vlm)  # checkpointing acts in train mode only
        student_out = completion_outputs(model.vlm, batch, student_memory, tokens, mask, model.latent_id, features,
                                         hidden=config.fused_jsd)
        model.vlm.eval()
        if config.fused_jsd:
            loss = generalized_jsd_from_hidden(student_out, teacher_out, cast(torch.Tensor, lm_head), mask, config.beta,
                                               config.jsd_temperature, config.jsd_chunk_size, num_items)
        else:
            loss = generalized_jsd(student_out, teacher_out, mask, config.beta, config.jsd_temperature,
                                   config.jsd_chunk_size, num_items)
        jsd = loss.detach()
        alignment = memory_alignment_loss(student_memory, teacher_memory)
        if config.memory_alignment:
            loss = loss + config.memory_alignment * alignment
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if step % config.log_every == 0 or step == total_steps - 1:
            logs = {"jsd": jsd.item(), "memory_alignment": alignment.item(), "lr": scheduler.get_last_lr()[0],
                    "generated_tokens_per_s": float(mask.sum()) / max(gen_seconds, 1e-9)}
            if gaps:
                logs["engine_logprob_gap"] = gaps[-1]
            accelerator.log(logs, step=step)
            bar.set_postfix(jsd=f"{logs['jsd']:.4f}")
        done = step + 1
        if accelerator.is_main_process and (done % config.save_every == 0 or done == total_steps):
            trainer.save_checkpoint(output, done, accelerator.unwrap_model(student), optimizer, scheduler,
                                    config=config)
        if on_step is not None:
            on_step(done)

    accelerator.wait_for_everyone()
    if config.adapt_steps:  # after the last checkpoint: a resumed run redoes it from the same A_psi, seeded alike
        adapt_lora(model, accelerator.unwrap_model(student), config, accelerator)
    adapter = sharding.adapter_state(model.vlm, sharded)  # the Stage II LoRA (adapted), gathered from its shards
    if accelerator.is_main_process:
        save_student(model, accelerator.unwrap_model(student), Path(config.model), output, config.answer_format,
                     adapter, trainer.training_record(config, "stage3"))
        if engine is not None:  # what the engine run showed (this run's steps)
            write_text_atomic(output / "engine_rollouts.json", json.dumps(
                {"engine": config.engine, "engine_logprob_gap_per_step": gaps}, indent=2))
    if engine is not None:
        engine.close()
    trainer.end_training(accelerator)
    return output


def adapt_lora(model: MedSynapseV, autonomous: AutonomousMemoryModule, config: Stage3Config,
               accelerator) -> list[float]:
    """`adapt_steps` steps of the answer's next-token loss with A_psi's memory in the slots, training only the LoRA
    (A_psi frozen, its memory detached): the language model learns to read M_auto instead of the teacher's M. Same
    batch size, batch order (seeded; the steps after the distillation's) and AdamW as the distillation; constant lr.
    Returns the losses."""
    dataset = training_dataset(config.train_file, model.prompts, config.families, config.answer_types,
                               with_answers=True, answer_format=config.answer_format)
    lora = [p for name, p in model.vlm.named_parameters() if "lora_" in name]
    if not lora:
        raise ValueError(f"{config.model}: adapt_steps needs the Stage II LoRA; this folder has none")
    for parameter in lora:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora, lr=config.adapt_lr, weight_decay=config.weight_decay)
    autonomous.eval()
    vlm_core = core_vlm(model.vlm)
    merge = cast("Qwen3VLVisionConfig", vlm_core.config.vision_config).spatial_merge_size
    total = config.max_steps or 1
    losses = []
    for step in tqdm(range(config.adapt_steps), desc="stage3 adapt", disable=not accelerator.is_main_process):
        indices = trainer.global_batch_indices(len(dataset), config.batch_size, total + step, config.seed)
        batch = model.prompts.collate([dataset.encoded(i) for i in indices], with_answers=True)
        batch = batch.to(accelerator.device)
        with torch.no_grad():
            features = vision_features(model.vlm, batch)
            grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
            memory = autonomous(features.pooler_output, grids, batch.images_per_sample)
        loss = trainer.answer_loss(model.vlm, batch, memory, model.latent_id, features)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        accelerator.log({"adapt_loss": losses[-1]}, step=total + step)
    for parameter in lora:
        parameter.requires_grad_(False)
    return losses


def save_student(model: MedSynapseV, autonomous: AutonomousMemoryModule, teacher_dir: Path, output: Path,
                 answer_format: str = "direct", adapter_state: dict | None = None,
                 training: dict | None = None) -> None:
    """The encoder-free folder: VLM reference + the Stage II adapter + A_psi; no encoder, no sampler."""
    student = MedSynapseV(model.vlm, model.processor, encoder=None, sampler=None, vlm_path=model.vlm_path,
                          autonomous=autonomous)
    student.answer_format = answer_format
    student.save_pretrained(output, adapter_state=adapter_state, training=training)
    # which teacher it was distilled from: by name and path relative to the student (no absolute path: the folder is
    # copied between machines); informational, nothing loads it
    teacher = {"teacher": teacher_dir.resolve().name,
               "relative_path": os.path.relpath(teacher_dir.resolve(), output.resolve())}
    write_text_atomic(output / "teacher.json", json.dumps(teacher))
