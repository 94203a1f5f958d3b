"""Every trainable recipe in one table: the three stages and the no-memory baselines.

Each entry says which config class and train function a name stands for (imported only when asked for: a recipe's
module pulls in torch and peft), the folder it writes under a run's output, the unit it starts from, the data and
budget a run file gives it, the answer format its model replies in, and the method's own settings (over what the
stages fill in; a key the run file's `baselines.<method>` section sets wins). The CLI's `train`, the run file
(`runconfig.resolve`, `resolve_baseline`), the pipeline and the study read it; nothing else chooses a recipe by its
name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Recipe:
    name: str  # as the CLI and run files spell it: stage1, sft, cot-sft, grpo, ...
    kind: Literal["stage", "baseline"]
    module: str  # under medsynapse.recipes
    config_name: str
    train_name: str
    folder: str  # under the run's output
    starts_from: Literal["base", "stage1", "stage2"]  # the model a unit of this recipe trains on top of
    data: Literal["stage1", "stage2", "baseline", "rationale"]  # the run file's training file it reads
    budget: Literal["stage1", "stage2", "stage3"]  # whose steps, batch and learning rate it gets in a run file
    answer_format: Literal["direct", "reasoning"] = "direct"
    forced: tuple[str, ...] = ()  # KEY=VALUE: the method's own settings, over what the stages fill in
    unless_set: tuple[tuple[str, Any], ...] = ()  # (key, value) it gets unless its `baselines` section sets the key

    def config_class(self) -> type[Any]:
        return getattr(importlib.import_module(f"medsynapse.recipes.{self.module}"), self.config_name)

    def train(self):
        """The training function: takes the config and returns the saved folder."""
        return getattr(importlib.import_module(f"medsynapse.recipes.{self.module}"), self.train_name)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("stage1", "stage", "stage1_warmup", "Stage1Config", "train_stage1", "stage1", "base", "stage1", "stage1"),
    Recipe("stage2", "stage", "stage2_ccr", "Stage2Config", "train_stage2", "stage2", "stage1", "stage2", "stage2"),
    Recipe("stage3", "stage", "stage3_imt", "Stage3Config", "train_stage3", "stage3_student", "stage2", "stage2",
           "stage3"),
    Recipe("sft", "baseline", "sft", "SFTConfig", "train_sft", "sft", "base", "baseline", "stage1",
           forced=("target=answer",)),
    Recipe("cot-sft", "baseline", "sft", "SFTConfig", "train_sft", "cot_sft", "base", "rationale", "stage1",
           answer_format="reasoning", forced=("target=rationale",)),
    Recipe("grpo", "baseline", "stage2_ccr", "Stage2Config", "train_stage2", "grpo_only", "base", "stage2", "stage2",
           forced=("use_memory=false", "lambda_causal=0")),
    Recipe("coconut", "baseline", "coconut", "CoconutConfig", "train_coconut", "coconut", "base", "rationale",
           "stage1", answer_format="reasoning"),
    Recipe("mcout", "baseline", "mcout", "MCOUTConfig", "train_mcout", "mcout", "base", "baseline", "stage1"),
    Recipe("ivt-lr", "baseline", "coconut", "CoconutConfig", "train_coconut", "ivt_lr", "base", "rationale", "stage1",
           answer_format="reasoning", unless_set=(("patches_per_step", 32),)),  # the reference's K
)}

STAGES = tuple(name for name, recipe in RECIPES.items() if recipe.kind == "stage")
# The no-memory baselines a run file can train (`medsynapse train baseline --method M`), with their folders.
BASELINES = {name: recipe.folder for name, recipe in RECIPES.items() if recipe.kind == "baseline"}


def recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is one line listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: stages {list(STAGES)}, baselines {list(BASELINES)}")
    return RECIPES[name]
