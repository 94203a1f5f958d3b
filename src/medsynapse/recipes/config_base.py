"""The settings every recipe's config shares, declared once (the TRL `GRPOConfig(TrainingArguments)` pattern).

A recipe's config subclasses `TrainingConfig` (and `LoRAConfig` when it trains a LoRA inside the VLM) and declares
only its own fields; it redeclares a shared field only to give it another default (its position stays the base's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# The choices a config value may take: checked when a file is read (config.from_dict: one line naming the file, the
# key and these values) and again by values.py for configs built in code.
DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]
ReportTo = Literal["tensorboard", "wandb", "mlflow", "none"]
Distributed = Literal["ddp", "fsdp"]
LossReduction = Literal["token", "sample", "sum"]
AnswerFormat = Literal["direct", "reasoning"]
Pooling = Literal["attention", "grid"]
Trajectories = Literal["student", "teacher"]
JSDPositions = Literal["all", "first"]
SFTTarget = Literal["answer", "rationale"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
RolloutSampling = Literal["keyed", "torch"]
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": get_args(DType), "distributed": get_args(Distributed), "report_to": get_args(ReportTo),
    "loss_reduction": get_args(LossReduction), "answer_format": get_args(AnswerFormat), "pooling": get_args(Pooling),
    "trajectories": get_args(Trajectories), "target": get_args(SFTTarget), "loss_type": get_args(LossType),
    "rollout_sampling": get_args(RolloutSampling), "jsd_positions": get_args(JSDPositions)}


@dataclass
class TrainingConfig:
    train_file: str = ""  # a MedSynapse JSONL file (data/schema.py)
    output_dir: str = "runs/train"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03  # of the optimiser steps, linear, then cosine decay
    grad_clip: float = 1.0
    batch_size: int = 32  # global batch, split over processes
    families: list[str] = field(default_factory=list)  # empty = every family
    answer_types: list[str] = field(default_factory=list)  # empty = every answer type (captions included)
    save_every: int = 100  # optimiser steps between checkpoints
    log_every: int = 10
    seed: int = 0
    resume: bool = False  # continue from the newest intact checkpoint in output_dir
    dtype: DType = "float32"
    report_to: ReportTo = "tensorboard"  # tensorboard (files in output_dir) | wandb | mlflow | none


@dataclass
class LoRAConfig:
    """A LoRA on the language model's projections (peft)."""

    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
