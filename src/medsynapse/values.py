"""Fail fast: every value of every stage of a run is checked before anything is built, loaded or trained.

`check_run(run)` is what `pipeline`, `study`, `train` and `demo` call first. It checks the model and eval sections,
every stage (runconfig.resolve) and every baseline (runconfig.resolve_baseline) as the recipes will receive them:
- numbers finite and in range (a positive learning rate, a warm-up ratio and a top-p in [0, 1], ...), choices known;
- sizes under bounds that reject absurd values before a model is built (`n_memory` <= 1024 memory slots, every
  width <= 65536, heads that divide their width, ...);
- (`memory=True`) a lower bound of one training step's memory, compared with the machine's: rows per process x
  tokens per row x the VLM's hidden size x its layers x bytes per value (one hidden state per layer and token, what
  any backward through the VLM keeps, even with activation checkpointing), plus the trained module (P_phi, the LoRA or
  A_psi) with its gradients and Adam moments (16 bytes per parameter). The machine's memory is the GPU's when there is
  one, else the RAM. The bound is deliberately low (nominal 64-token question, 64 image tokens): it refuses what
  cannot run anywhere near this machine, it does not promise that what passes fits.
Each refusal is one ConfigError naming `FILE.section.key` (and where a stage's value came from, e.g. `model.n_memory`).
`check_config(config, where)` does the same for one recipe config. A stage or baseline section that names its own
model folder (`stage2: {model: FOLDER}`) is bounded by the VLM and N that folder holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from medsynapse.config import ConfigError
from medsynapse.recipes.config_base import CHOICES

MAX_MEMORY_SLOTS = 1024  # N: P_phi's probes / memory vectors (the paper: 16)
MAX_WIDTH = 65_536  # any width: P_phi's, A_psi's MLP and query width, a LoRA rank, prior_dim
MAX_HEADS = 256
MAX_NEW_TOKENS = 131_072
NOMINAL_PROMPT_TOKENS = 64  # question and chat template: the low end, so the memory bound stays a lower bound
NOMINAL_IMAGE_TOKENS = 64  # merged visual tokens of one image (Qwen3-VL: 256 px a side); SynthMed computes its own
TRAINED_BYTES_PER_PARAMETER = 16  # fp32 weight + gradient + two Adam moments
PRIOR_DIM_GUESS = 256  # P_phi's input projection, prior_dim x width: SAM-family necks give 256 channels
MEMORY_ENV = "MEDSYNAPSE_MEMORY_GIB"  # the memory to check against, to plan for another machine than this one

# (low, high, low_open, high_open); None: unbounded. Integers are also checked to be integers.
_INT, _FLOAT = "int", "float"
RULES: dict[str, tuple[str, float | None, float | None, bool, bool]] = {
    "n_memory": (_INT, 1, MAX_MEMORY_SLOTS, False, False),
    "sampler_width": (_INT, 1, MAX_WIDTH, False, False),
    "sampler_layers": (_INT, 1, 64, False, False),
    "sampler_heads": (_INT, 1, MAX_HEADS, False, False),
    "prior_dim": (_INT, 1, MAX_WIDTH, False, False),
    "lora_r": (_INT, 1, MAX_WIDTH, False, False),
    "lora_alpha": (_FLOAT, 0, None, True, False),
    "lora_dropout": (_FLOAT, 0, 1, False, True),
    "mlp_hidden": (_INT, 0, MAX_WIDTH, False, False),  # 0: the VLM's hidden size
    "autonomous_mlp_hidden": (_INT, 0, MAX_WIDTH, False, False),
    "attention_dim": (_INT, 1, MAX_WIDTH, False, False),
    "attention_heads": (_INT, 1, MAX_HEADS, False, False),
    "max_images": (_INT, 1, 64, False, False),
    "batch_size": (_INT, 1, 1 << 20, False, False),
    "group_size": (_INT, 1, 1024, False, False),
    "max_new_tokens": (_INT, 1, MAX_NEW_TOKENS, False, False),
    "num_iterations": (_INT, 1, 64, False, False),
    "max_steps": (_INT, 0, None, False, False),
    "steps_per_stage": (_INT, 0, None, False, False),
    "save_every": (_INT, 1, None, False, False),
    "log_every": (_INT, 1, None, False, False),
    "reference_bank_size": (_INT, 1, 1 << 20, False, False),
    "jsd_chunk_size": (_INT, 1, 1 << 20, False, False),
    "thoughts": (_INT, 1, 1024, False, False),
    "thoughts_per_step": (_INT, 1, 1024, False, False),
    "max_latent_stage": (_INT, 1, 64, False, False),
    "patches_per_step": (_INT, 0, 4096, False, False),
    "lr": (_FLOAT, 0, None, True, False),
    "weight_decay": (_FLOAT, 0, None, False, False),
    "warmup_ratio": (_FLOAT, 0, 1, False, False),
    "grad_clip": (_FLOAT, 0, None, True, False),
    "epochs": (_FLOAT, 0, None, False, False),
    "epochs_per_stage": (_FLOAT, 0, None, False, False),
    "temperature": (_FLOAT, 0, None, True, False),
    "sample_temperature": (_FLOAT, 0, None, True, False),
    "jsd_temperature": (_FLOAT, 0, None, True, False),
    "top_p": (_FLOAT, 0, 1, True, False),
    "epsilon": (_FLOAT, 0, None, True, False),
    "beta": (_FLOAT, 0, None, False, False),  # Stage II: the KL weight (Stage III: the JSD's β, below)
    "lambda_acc": (_FLOAT, 0, None, False, False),
    "lambda_causal": (_FLOAT, 0, None, False, False),
    "advantage_eps": (_FLOAT, 0, None, False, False),
    "advantage_std_floor": (_FLOAT, 0, None, False, False),
    "record_last_fraction": (_FLOAT, 0, 1, True, False),
    "memory_alignment": (_FLOAT, 0, None, False, False),
    "adapt_steps": (_INT, 0, None, False, False),
    "adapt_lr": (_FLOAT, 0, None, True, False),
    "mu": (_FLOAT, 0, None, False, False),
    "base_grounding_weight": (_FLOAT, 0, None, False, False),
}
CLASS_RULES = {"Stage3Config": {"beta": (_FLOAT, 0, 1, False, False)}}  # the generalized JSD's β
OPTIONAL = {"causal_clip", "epsilon_high", "max_new_tokens", "limit"}  # None (null) is a value of these
# CHOICES: the Literal types of recipes/config_base.py (config.from_dict checks them when a file is read)


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"{where}: {message}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def check_value(name: str, value: Any, where: str, rule: tuple | None = None) -> None:
    """One value against its rule (RULES) or choices (CHOICES); ConfigError naming `where`."""
    rule = rule or RULES.get(name)
    if value is None and name in OPTIONAL:
        return
    if rule is not None:
        kind, low, high, low_open, high_open = rule
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(where, f"expected a number, got {value!r}")
        if not math.isfinite(value) and not (name == "grad_clip" and value == math.inf):  # inf: no clipping
            _fail(where, f"must be a finite number, got {value!r}")
        if kind == _INT and value != int(value):
            _fail(where, f"must be an integer, got {value!r}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            left = "unbounded" if low is None else f"{'(' if low_open else '['}{_number(low)}"
            right = "" if high is None else f"{_number(high)}{')' if high_open else ']'}"
            span = f"in {left}, {right}" if high is not None else f"{'>' if low_open else '>='} {_number(low)}"
            _fail(where, f"must be {span}, got {value!r}")
    elif name in CHOICES and value not in CHOICES[name]:
        _fail(where, f"{value!r}; expected one of {list(CHOICES[name])}")


def check_config(config: Any, where: str, origins: dict[str, str] | None = None) -> None:
    """Every value of one recipe config (Stage1Config, Stage2Config, Stage3Config, SFTConfig, CoconutConfig,
    MCOUTConfig, ...): the rules above, then the recipe's own cross-field checks. `origins`: key -> the
    `FILE.section.key` a value came from, when not `where.key` (a stage's `n_memory` from `model.n_memory`)."""
    origins = origins or {}
    rules = CLASS_RULES.get(type(config).__name__, {})

    def at(name: str) -> str:
        return origins.get(name, f"{where}.{name}")

    for field in dataclasses.fields(config):
        check_value(field.name, getattr(config, field.name), at(field.name), rules.get(field.name))
    names = {f.name for f in dataclasses.fields(config)}
    if {"sampler_width", "sampler_heads"} <= names and config.sampler_width % config.sampler_heads:
        _fail(at("sampler_heads"), f"{config.sampler_heads} heads do not divide sampler_width "
                                   f"{config.sampler_width} (each head gets width / heads channels)")
    if {"attention_dim", "attention_heads"} <= names and config.attention_dim % config.attention_heads:
        _fail(at("attention_heads"), f"{config.attention_heads} heads do not divide attention_dim "
                                     f"{config.attention_dim}")
    if "engine" in names:
        check_engine_value(config.engine, at("engine"))
    if "lora_targets" in names and not config.lora_targets:
        _fail(at("lora_targets"), "no module named: the LoRA would train nothing")
    if "epsilon_high" in names and config.epsilon_high is not None and not (
            math.isfinite(config.epsilon_high) and config.epsilon_high >= config.epsilon):
        _fail(at("epsilon_high"), f"must be null or a finite number >= epsilon ({config.epsilon}), got "
                                  f"{config.epsilon_high!r}")
    if type(config).__name__ == "Stage2Config":  # the reward and advantage settings' own rules
        from medsynapse.recipes.stage2_ccr import check_config as check_stage2

        try:
            check_stage2(config)
        except ValueError as err:
            _fail(where, str(err))
        if not config.use_memory and config.lambda_causal != 0:
            _fail(at("lambda_causal"), "use_memory: false has no counterfactual memory; set lambda_causal: 0")
    if type(config).__name__ == "Stage2Config" and config.max_steps < 1:
        _fail(at("max_steps"), f"must be >= 1 (Stage II has no epochs), got {config.max_steps}")
    if "epochs" in names and "max_steps" in names and config.max_steps == 0 and config.epochs <= 0:
        _fail(at("max_steps"), "0 (use epochs) with epochs 0: nothing would be trained")
    if "steps_per_stage" in names and config.steps_per_stage == 0 and config.epochs_per_stage <= 0:
        _fail(at("steps_per_stage"), "0 (use epochs_per_stage) with epochs_per_stage 0: nothing would be trained")


# --- the memory bound ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VLMShape:
    hidden: int
    layers: int
    vocab: int
    image_tokens: int
    source: str  # where the sizes were read


def _qwen_text_config(folder: Path) -> dict | None:
    """The text config of a Qwen3-VL folder, or of the VLM a MedSynapse folder names; None when neither is there."""
    from medsynapse.model.bases import resolve_base
    from medsynapse.model.medsynapse import MANIFEST

    if (folder / MANIFEST).is_file():
        try:
            # (a manifest without a VLM: Path(None) raises the TypeError caught below)
            folder = Path(cast(str, resolve_base(json.loads((folder / MANIFEST).read_text())["vlm"], folder, "vlm")))
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, or its base not found: sizes unknown
            return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config", config)
    sizes = ("hidden_size", "num_hidden_layers", "vocab_size")
    return text if all(isinstance(text.get(k), int) for k in sizes) else None


def folder_memory_slots(folder: str) -> int:
    """N of the sampler a MedSynapse folder holds (what a Stage II/III prompt carries); 0 when it has none."""
    from medsynapse.model.medsynapse import MANIFEST

    try:
        sampler = json.loads((Path(folder).expanduser() / MANIFEST).read_text()).get("sampler") or {}
        return int(sampler.get("n_memory", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def vlm_shape(folder: str, architecture: str = "", synthmed: dict | None = None) -> VLMShape | None:
    """The VLM's hidden size and layer count: its folder's config.json, else (SynthMed) the tiny VLM the demo builds,
    else the architecture preset (`inspect`'s); None when none is known."""
    if folder:
        text = _qwen_text_config(Path(folder).expanduser())
        if text is not None:
            return VLMShape(text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], NOMINAL_IMAGE_TOKENS,
                            folder)
    if synthmed is not None:
        from medsynapse.model.tiny import TinyVLMSpec

        spec = TinyVLMSpec()
        resolution = int(synthmed.get("vlm_resolution", 128)) or int(synthmed.get("image_size", 64))
        return VLMShape(spec.hidden, spec.layers, spec.vocab_size, max(1, resolution // 32) ** 2,
                        "the SynthMed tiny VLM")
    if architecture:
        from medsynapse.inspection import PRESETS

        if architecture in PRESETS:
            text = PRESETS[architecture]["text_config"]
            return VLMShape(text["hidden_size"], text["num_hidden_layers"], text["vocab_size"],
                            NOMINAL_IMAGE_TOKENS, f"the {architecture} preset")
    return None


def machine_memory() -> tuple[int, str]:
    """Bytes one process can use at most, and what they are: $MEDSYNAPSE_MEMORY_GIB when set, else the GPU's memory
    when there is one, else the machine's RAM."""
    if os.environ.get(MEMORY_ENV):
        try:
            return int(float(os.environ[MEMORY_ENV]) * 2**30), f"${MEMORY_ENV}"
        except ValueError:
            raise ConfigError(f"${MEMORY_ENV}: expected a number of GiB, got {os.environ[MEMORY_ENV]!r}") from None
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"the GPU's ({props.name})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def _bytes_per_value(dtype: str) -> int:
    return {"float32": 4, "float64": 8}.get(dtype, 2)  # auto: a real checkpoint's bf16 (the low end)


def step_memory(kind: str, config: Any, shape: VLMShape, n_memory: int = 0, world: int = 1) -> tuple[int, str, str]:
    """A lower bound of one training step's memory in bytes, the key that sets its size, and the arithmetic in words.
    `kind`: a stage or a baseline method; `n_memory`: the memory slots a Stage II/III prompt carries. Counted: one
    hidden state per layer and token, the (N, T, V) logits where the recipe materialises them (Stage I's forward,
    Stage II's scoring of the completions under M and M', Stage III's unfused JSD), the trained module's parameters
    with gradients and Adam moments."""
    h, layers, vocab = shape.hidden, shape.layers, shape.vocab
    prompt = NOMINAL_PROMPT_TOKENS + shape.image_tokens * getattr(config, "max_images", 1)
    lora = getattr(config, "lora_r", 0) * 2 * h * len(getattr(config, "lora_targets", [])) * layers
    copies, logit_positions = 1, 0  # hidden-state copies per row; positions per row whose logits are held at once
    recipe = type(config).__name__  # the recipe's config class (registry.RECIPES): what a step holds
    if recipe == "Stage1Config":
        rows, tokens = config.batch_size, prompt + config.n_memory + 16
        w = config.sampler_width
        trained = config.n_memory * w + config.sampler_layers * 12 * w * w + w * h + PRIOR_DIM_GUESS * w
        logit_positions = tokens
    elif recipe == "Stage2Config":  # Stage II and GRPO-only
        rows = config.batch_size * config.group_size
        tokens = prompt + (n_memory if config.use_memory else 0) + config.max_new_tokens
        trained = lora
        logit_positions = config.max_new_tokens * (2 if config.use_memory else 1)  # M rows and M' rows
    elif recipe == "Stage3Config":
        rows, tokens, copies = config.batch_size, prompt + n_memory + config.max_new_tokens, 2  # teacher + student
        mlp = config.mlp_hidden or h
        trained = 2 * h * mlp + (config.attention_dim * (h + n_memory) if config.pooling == "attention" else 0)
        logit_positions = 0 if config.fused_jsd else 2 * config.max_new_tokens
    elif recipe == "CoconutConfig":  # Coconut, IVT-LR
        slots = config.max_latent_stage * config.thoughts_per_step * (1 + config.patches_per_step)
        rows, tokens, trained = config.batch_size, prompt + slots + 64, lora
    elif recipe == "MCOUTConfig":
        rows, tokens, trained = config.batch_size, prompt + config.thoughts + 64, lora + 4 * h * config.attention_dim
    else:  # sft, cot-sft: logits of the answer window only
        rows, tokens, trained = config.batch_size, prompt + 64, lora
    per_process = -(-rows // max(1, world))
    value = _bytes_per_value(getattr(config, "dtype", "auto"))
    activations = copies * per_process * tokens * h * layers * value
    logits = per_process * logit_positions * vocab * 4  # float32 for the log-softmax
    total = activations + logits + trained * TRAINED_BYTES_PER_PARAMETER
    size_key = _largest_change(config, ("batch_size", "group_size", "max_new_tokens", "n_memory", "sampler_width",
                                        "lora_r", "mlp_hidden", "thoughts", "patches_per_step"))
    words = (f"{per_process} sequences{' per process' if world > 1 else ''} x ~{tokens} tokens x hidden {h} x {layers} "
             f"layers x {value} bytes{' x 2 (teacher and student)' if copies == 2 else ''} of hidden states"
             + (f" + {logit_positions} positions x {vocab} vocabulary x 4 bytes of logits per sequence"
                if logit_positions else "")
             + f" + {trained / 1e6:,.1f} M trained parameters x {TRAINED_BYTES_PER_PARAMETER} bytes")
    return total, size_key, words


def _largest_change(config: Any, keys: tuple[str, ...]) -> str:
    """Of the size keys a config has, the one furthest above its default (the one to lower, most likely)."""
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(config)}
    ratios = {k: getattr(config, k) / max(1, defaults[k]) for k in keys
              if k in defaults and isinstance(defaults[k], int) and isinstance(getattr(config, k), int)}
    return max(ratios, key=cast("Callable[[str], float]", ratios.get)) if ratios else "batch_size"  # (its own keys)


def check_memory(kind: str, config: Any, where: str, shape: VLMShape | None, n_memory: int = 0,
                 origins: dict[str, str] | None = None) -> None:
    """Refuse a training step whose memory lower bound (step_memory) exceeds the machine's (machine_memory)."""
    if shape is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    need, key, words = step_memory(kind, config, shape, n_memory, world)
    have, what = machine_memory()
    if need > have:
        at = (origins or {}).get(key, f"{where}.{key}")
        raise ConfigError(f"{at}: one training step needs at least {need / 2**30:,.1f} GiB ({words}; VLM sizes from "
                          f"{shape.source}), more than {what} {have / 2**30:,.1f} GiB; lower batch_size, "
                          f"max_new_tokens or the sizes (or set ${MEMORY_ENV} to plan for a larger machine)")


# --- a whole run file ----------------------------------------------------------------------------------------------

# the stage keys the model and data sections fill in (runconfig._filled), with the section key they come from
_FROM_MODEL = {"stage1": {"n_memory": "n_memory", "sampler_width": "sampler_width", "sampler_layers": "sampler_layers",
                          "sampler_heads": "sampler_heads", "max_images": "max_images"},
               "stage2": {"lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_targets": "lora_targets"},
               "stage3": {"mlp_hidden": "autonomous_mlp_hidden"}}
_LORA = {"lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_targets": "lora_targets"}
# a baseline's keys filled from Stage I (runconfig.resolve_baseline); grpo takes all of Stage II's
_FROM_STAGE1 = ("lr", "batch_size", "max_steps", "epochs", "warmup_ratio", "weight_decay", "grad_clip",
                "loss_reduction", "families", "answer_types", "save_every", "log_every", "seed", "dtype")


def stage_origins(run, stage: str) -> dict[str, str]:
    """Where each resolved value of a stage that the stage section does not set comes from."""
    section = getattr(run, stage)
    return {key: f"{run.source}.model.{model_key}" for key, model_key in _FROM_MODEL.get(stage, {}).items()
            if key not in section}


def baseline_origins(run, method: str) -> dict[str, str]:
    section = run.baselines.get(method, {})
    from medsynapse.recipes.registry import RECIPES

    if RECIPES[method].budget == "stage2":  # GRPO-only: Stage II's resolved settings
        out = {key: f"{run.source}.stage2.{key}" for key in run.stage2}
        out.update(stage_origins(run, "stage2"))
    else:
        stage1 = stage_origins(run, "stage1")
        out = {key: stage1.get(key, f"{run.source}.stage1.{key}") for key in _FROM_STAGE1}
        out.update({key: f"{run.source}.model.{model_key}" for key, model_key in _LORA.items()})
    return {key: value for key, value in out.items() if key not in section}


def check_eval(run) -> None:
    e, where = run.eval, f"{run.source}.eval"
    check_value("batch_size", e.batch_size, f"{where}.batch_size")
    check_value("max_new_tokens", e.max_new_tokens, f"{where}.max_new_tokens")
    if e.limit is not None:
        check_value("limit", e.limit, f"{where}.limit", (_INT, 1, None, False, False))
    if e.answer_format is not None:
        check_value("answer_format", e.answer_format, f"{where}.answer_format")
    check_engine_value(e.engine, f"{where}.engine")


def check_engine_value(engine: str, where: str) -> None:
    """An engine this environment can run (vLLM importable for `vllm`), refused before anything trains: one line
    naming `where` (FILE.section.key)."""
    from medsynapse.engines import check_engine

    try:
        check_engine(engine)
    except ValueError as err:
        _fail(where, str(err))


def check_run(run, memory: bool = True, memory_for: set[str] | None = None) -> None:
    """Every value of every stage and baseline of a run file (module docstring); with `memory`, the memory lower
    bound of each training step against this machine's: of every stage and baseline, or of those in `memory_for`
    (what this command trains; the others may train on another machine)."""
    from medsynapse.runconfig import BASELINES, STAGES, resolve, resolve_baseline

    m, source = run.model, run.source
    for name in ("prior_dim", "max_images", "autonomous_mlp_hidden"):
        check_value(name, getattr(m, name), f"{source}.model.{name}")
    check_eval(run)
    shape = vlm_shape(m.vlm, m.architecture, run.synthmed if run.synthmed else None) if memory else None
    n_memory = m.n_memory
    for stage in STAGES:
        config = resolve(run, stage)
        origins = stage_origins(run, stage)
        check_config(config, f"{source}.{stage}", origins)
        if stage == "stage1":
            n_memory = config.n_memory  # the slots Stages II-III's prompts carry
        if memory and (memory_for is None or stage in memory_for):
            own = _own_folder(getattr(run, stage))  # `stage2: {model: FOLDER}`: that folder's VLM and N
            check_memory(stage, config, f"{source}.{stage}", vlm_shape(own) or shape if own else shape,
                         n_memory=folder_memory_slots(own) or n_memory if own else n_memory, origins=origins)
    for method in BASELINES:
        config = resolve_baseline(run, method)
        where, origins = f"{source}.baselines.{method}", baseline_origins(run, method)
        check_config(config, where, origins)
        if memory and (memory_for is None or method in memory_for):
            own = _own_folder(run.baselines.get(method, {}))
            check_memory(method, config, where, vlm_shape(own) or shape if own else shape, origins=origins)


def _own_folder(section: dict) -> str:
    """The model folder a stage or baseline section names itself (`vlm` or `model`), over the model section's."""
    return str(section.get("vlm") or section.get("model") or "")
