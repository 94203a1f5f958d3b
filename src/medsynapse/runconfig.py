"""One config file per run: `model`, `data`, `stage1`, `stage2`, `stage3` and `eval` sections that every command reads.

A run file names the backbone and encoder once (`model`), the training files once (`data`), and per stage only what
differs from the recipe's defaults; `resolve` turns it into the recipe's own config (Stage1Config, Stage2Config,
Stage3Config) with the model and data values filled in under the recipe's names and the folders chained:
`<output>/stage1` → `<output>/stage2` → `<output>/stage3_student`. A key in a stage section wins over what the other
sections fill in (a stage trained from another folder: `stage2: {model: FOLDER}`). Run files are the only config
files the commands read (the flat recipe files of 0.1 are refused with a line saying where their keys go).

`medsynapse config show FILE [--set key=value]` prints every stage's resolved settings, defaults included.
A `synthmed` section (configs/synthmed.yaml) holds the demo's SynthMed-only settings: `medsynapse demo` builds the data,
the tiny VLM and the encoder from it, fills in `model.vlm`, `model.encoder` and `data.stage1_file`, then runs the same
pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from medsynapse.config import ConfigError, apply_overrides, from_dict, read_yaml
from medsynapse.data.corpora import CorpusSpec, check_specs
from medsynapse.engines import Engine
from medsynapse.recipes.registry import BASELINES, RECIPES, STAGES, Recipe

SECTIONS = ("output", "model", "data", "eval", *STAGES, "baselines", "synthmed")


@dataclass
class ModelSection:
    vlm: str = ""  # a local Qwen3-VL folder
    architecture: str = "qwen3-vl-8b"  # `inspect`'s preset when the folder is absent (meta device)
    encoder: str = ""  # a prior-encoder folder
    encoder_kind: str = "sam3-vision"  # `inspect` only: which published encoder size to count
    # A SAM 3 encoder's prior-token level (model/encoders/sam3.py: fpn_1x, fpn_2x, fpn_4x, fpn_0.5x, vit). "": not
    # chosen here (the encoder folder's medsynapse_sam3.json decides, else fpn_1x). Chosen: `inspect` refuses a
    # prior_dim of another width and an encoder folder set to another level.
    encoder_feature_level: str = ""
    prior_dim: int = 1024  # `inspect` only (at run time the encoder folder gives it)
    n_memory: int = 16  # N probes / memory vectors
    sampler_width: int = 256
    sampler_layers: int = 2
    sampler_heads: int = 4
    lora_r: int = 64
    lora_alpha: int = 128
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    autonomous_mlp_hidden: int = 0  # A_psi's MLP width (0 = the VLM's hidden size)
    # images per question the memory tells apart (an image-index embedding in P_phi, and in A_psi's attention
    # pooling); 1: none (SynthMed has one image per question). Every image reaches the memory either way.
    max_images: int = 1


@dataclass
class DataSection:
    stage1_file: str = ""  # Stage I's JSONL (paper: 50K PubMedVision image-text pairs)
    stage2_file: str = ""  # Stages II and III (paper: 3K OmniMedVQA + 1K SLAKE/PathVQA open); empty: stage1_file
    prior_cache: str = ""  # prior-feature cache folder shared by the stages
    # Corpora by name (data/corpora.py): the pipeline's `convert` step writes them into the stage's file (when the
    # file is empty: OUTPUT/data/stage1.jsonl, OUTPUT/data/stage2.jsonl), reading DATA_ROOT/<published folder>.
    data_root: str = ""
    stage1_corpora: list[CorpusSpec] = field(default_factory=list)
    stage2_corpora: list[CorpusSpec] = field(default_factory=list)
    subset_seed: int = 0  # the seed of every corpus's `size` subset
    skip_bad: bool = False  # skip (and count) bad records instead of stopping at the first
    # The no-memory baselines train on what MedSynapse-V sees across its stages: `baseline_file`, or (when Stage II's
    # file differs from Stage I's) OUTPUT/data/baselines.jsonl, both files' records, written by the convert step.
    baseline_file: str = ""
    # The reasoning rows (CoT-SFT, Coconut, IVT-LR) need `rationale` steps: `rationale_file`, or the converted
    # `rationale_corpora` (OUTPUT/data/rationale.jsonl, e.g. PubMedVision with rationale=sentences), else the baseline
    # file. A separate file, so that Stage I's and SFT's data stay as they are.
    rationale_file: str = ""
    rationale_corpora: list[CorpusSpec] = field(default_factory=list)


def stage1_file(run: RunConfig) -> str:
    """Stage I's training file: `data.stage1_file`, or where the convert step writes `data.stage1_corpora`."""
    d = run.data
    return d.stage1_file or (str(Path(run.output) / "data" / "stage1.jsonl") if d.stage1_corpora else "")


def stage2_file(run: RunConfig) -> str:
    """Stages II-III's training file: `data.stage2_file` or the converted `stage2_corpora`; else Stage I's."""
    d = run.data
    return (d.stage2_file or (str(Path(run.output) / "data" / "stage2.jsonl") if d.stage2_corpora else "")
            or stage1_file(run))


def baseline_file(run: RunConfig) -> str:
    """The no-memory baselines' training file: every record of Stage I's and Stage II's files (DataSection)."""
    d, first, second = run.data, stage1_file(run), stage2_file(run)
    if d.baseline_file:
        return d.baseline_file
    if not first or second == first:  # one file (or none) for every stage: nothing to join
        return first or second
    return str(Path(run.output) / "data" / "baselines.jsonl")


def rationale_file(run: RunConfig) -> str:
    """The reasoning rows' training file (DataSection.rationale_file)."""
    d = run.data
    return (d.rationale_file or (str(Path(run.output) / "data" / "rationale.jsonl") if d.rationale_corpora else "")
            or baseline_file(run))


@dataclass
class EvalSection:
    benchmarks: list[str] = field(default_factory=lambda: ["vqa-rad", "slake", "pathvqa", "pmc-vqa", "mmmu-med",
                                                           "medxpertqa-mm", "gmai-mmbench"])
    data_root: str = ""
    batch_size: int = 8
    answer_format: str | None = None  # direct | reasoning (answers.py); None: as each model was trained
    max_new_tokens: int | None = None  # None: each benchmark's protocol budget
    limit: int | None = None  # first N scored questions per benchmark (smoke runs)
    engine: Engine = "hf"  # hf: transformers' generate | vllm: vLLM with the memory injected (needs .venv-vllm)


@dataclass
class RunConfig:
    output: str = "runs/medsynapse-v"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    stage3: dict = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)
    baselines: dict = field(default_factory=dict)  # per method (BASELINES): settings over what `resolve_baseline` fills
    synthmed: dict = field(default_factory=dict)  # the demo's SynthMed-only steps (steps/synthmed.py, DemoConfig)
    source: str = "config"  # the file it was read from (error messages); not a YAML key


def is_run_config(data: Any) -> bool:
    """A run file has a `model` mapping or one of the other sections (a recipe's own keys at the top level, as the
    removed flat recipe files had them, are not a run file: `model` there was a folder)."""
    return isinstance(data, dict) and (isinstance(data.get("model"), dict)
                                       or any(k in data for k in ("data", "eval", *STAGES, "baselines")))


def read_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path) or {}
    if not is_run_config(data):
        keys = sorted(data)[:4] if isinstance(data, dict) else []
        raise ConfigError(f"{path}: not a run file (it needs a `model:` mapping or data/eval/stage1/stage2/stage3/"
                          f"baselines sections; top-level keys {keys} look like a recipe's own: put them under the "
                          "stage's section, e.g. `stage1:`, or a baseline's under `baselines: {sft: ...}`)")
    return run_config_from(data, str(path), overrides)


def run_config_from(data: dict, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(dict(data), overrides or [])
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    run = from_dict(RunConfig, data, source)
    for stage in (*STAGES, "baselines", "synthmed"):
        if not isinstance(getattr(run, stage), dict):
            raise ConfigError(f"{source}.{stage}: expected a mapping")
    for key in ("stage1_corpora", "stage2_corpora", "rationale_corpora"):
        try:
            check_specs(getattr(run.data, key), f"data.{key}")
        except ValueError as error:
            raise ConfigError(f"{source}.{error}") from None
    unknown = sorted(set(run.baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f"{source}.baselines: unknown method(s) {unknown}; known: {list(BASELINES)}")
    run.source = source
    return run


def _filled(run: RunConfig, stage: str) -> dict:
    """What the model and data sections give a stage, under the recipe's names."""
    m, d, out = run.model, run.data, Path(run.output)
    rl_file = stage2_file(run)
    folder = {name: str(out / RECIPES[name].folder) for name in STAGES}
    if stage == "stage1":
        return dict(vlm=m.vlm, encoder=m.encoder, train_file=stage1_file(run), output_dir=folder["stage1"],
                    n_memory=m.n_memory, sampler_width=m.sampler_width, sampler_layers=m.sampler_layers,
                    sampler_heads=m.sampler_heads, prior_cache=d.prior_cache, max_images=m.max_images)
    if stage == "stage2":
        return dict(model=folder[RECIPES["stage2"].starts_from], train_file=rl_file, output_dir=folder["stage2"],
                    lora_r=m.lora_r, lora_alpha=m.lora_alpha, lora_targets=list(m.lora_targets),
                    prior_cache=d.prior_cache)
    if stage == "stage3":
        return dict(model=folder[RECIPES["stage3"].starts_from], train_file=rl_file, output_dir=folder["stage3"],
                    mlp_hidden=m.autonomous_mlp_hidden, prior_cache=d.prior_cache)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def _stage(stage: str) -> Recipe:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return RECIPES[stage]


def stage_class(stage: str) -> type:
    """The config class of a stage's recipe."""
    return _stage(stage).config_class()


def resolve(run: RunConfig, stage: str):
    """The recipe config of `stage`: the model/data values, then the stage section's own keys on top (strict: an
    unknown key in a stage section is an error naming `FILE.stageN.key`)."""
    return from_dict(stage_class(stage), {**_filled(run, stage), **getattr(run, stage)}, f"{run.source}.{stage}")


def resolve_baseline(run: RunConfig, method: str):
    """The recipe config of a no-memory baseline, trained on the data MedSynapse-V sees across its stages with the
    budget of the stage that shares its objective (the paper's controls: same data, same backbone), then the
    `baselines.<method>` keys on top:
    - sft: LoRA (the model section's) + next-token loss on `baseline_file` (Stage I's and Stage II's records) with
      Stage I's steps / epochs, batch, lr and schedule;
    - cot-sft: the same on `rationale_file`'s reasoning steps + tagged answer (`target: rationale`), replying in
      `reasoning` format;
    - grpo: Stage II's resolved settings (its data: the accuracy reward needs Stage II's short verifiable answers) on
      the plain VLM, with no memory and no causal term (GRPO-only);
    - coconut, ivt-lr: `rationale_file`, Stage I's batch, lr and steps, split evenly over the curriculum's stages and
      its final all-latent phase (ivt-lr: K 32 image tokens per latent step unless the section says otherwise);
    - mcout: `baseline_file`, Stage I's batch, lr and steps (MCOUT-Multi, the answer as target).
    Folders: OUTPUT/<method> (grpo: OUTPUT/grpo_only, cot-sft: OUTPUT/cot_sft)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {list(BASELINES)}")
    recipe, m, out = RECIPES[method], run.model, Path(run.output)
    where, overrides = f"{run.source}.baselines.{method}", run.baselines.get(method, {})
    if recipe.budget == "stage2":  # GRPO-only: Stage II's resolved settings on the plain VLM
        filled = {**dataclasses.asdict(resolve(run, "stage2")), "model": m.vlm, "output_dir": str(out / recipe.folder)}
        return from_dict(recipe.config_class(), {**apply_overrides(filled, list(recipe.forced)), **overrides}, where)
    s1 = resolve(run, "stage1")  # Stage I's budget: its batch, lr, steps and schedule, the model section's LoRA
    file = {"baseline": baseline_file, "rationale": rationale_file}[recipe.data](run)
    filled = dict(model=m.vlm, train_file=file, output_dir=str(out / recipe.folder), lora_r=m.lora_r,
                  lora_alpha=m.lora_alpha, lora_targets=list(m.lora_targets), lr=s1.lr, batch_size=s1.batch_size,
                  weight_decay=s1.weight_decay, grad_clip=s1.grad_clip, loss_reduction=s1.loss_reduction,
                  families=list(s1.families), answer_types=list(s1.answer_types), save_every=s1.save_every,
                  log_every=s1.log_every, seed=s1.seed, dtype=s1.dtype)
    config_class = recipe.config_class()
    if hasattr(config_class, "steps_per_stage"):  # Coconut, IVT-LR: the budget split evenly over the curriculum
        from medsynapse.recipes.coconut import n_stages

        stages = n_stages(int(overrides.get("max_latent_stage", config_class.max_latent_stage)),
                          bool(overrides.get("final_stage", config_class.final_stage)))  # + the all-latent phase
        filled.update(steps_per_stage=max(1, s1.max_steps // stages) if s1.max_steps else 0,
                      epochs_per_stage=s1.epochs / stages)
    else:
        filled.update(max_steps=s1.max_steps, epochs=s1.epochs)
        if recipe.module == "sft":  # (MCOUT-Multi keeps its own warmup, 0: as before)
            filled["warmup_ratio"] = s1.warmup_ratio
    filled.update(dict(recipe.unless_set))
    return from_dict(config_class, {**apply_overrides(filled, list(recipe.forced)), **overrides}, where)


def with_seed(run: RunConfig, seed: int) -> RunConfig:
    """The run with every stage (and so every baseline resolved from them) at training seed `seed`."""
    return dataclasses.replace(run, **cast("dict[str, Any]", {stage: {**getattr(run, stage), "seed": seed}
                                                              for stage in STAGES}))  # stage1..3: dict fields


def stage_recipe(stage: str):
    """The training function of a stage (each takes the config `resolve` gives)."""
    return _stage(stage).train()


def baseline_recipe(method: str):
    """The training function of a baseline method (each takes the config `resolve_baseline` gives)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {list(BASELINES)}")
    return RECIPES[method].train()


def show(run: RunConfig) -> dict:
    """Every section as plain data, each stage fully resolved (the recipe's defaults included)."""
    out = {"output": run.output, "model": dataclasses.asdict(run.model), "data": dataclasses.asdict(run.data),
           "eval": dataclasses.asdict(run.eval)}
    for stage in STAGES:
        out[stage] = dataclasses.asdict(resolve(run, stage))
    out["baselines"] = {method: dataclasses.asdict(resolve_baseline(run, method)) for method in BASELINES}
    if run.synthmed:
        out["synthmed"] = dict(run.synthmed)  # `medsynapse config show` resolves it with the demo's defaults
    return out
