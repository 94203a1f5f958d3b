"""`medsynapse inspect`: build a real-size MedSynapse-V on the meta device (no weights, no memory) and report, per
stage, trainable and frozen parameters and a training-memory estimate.

The VLM comes from the folder's config.json when the folder exists, else from a built-in architecture preset taken
from the published Qwen3-VL config.json files (qwen3vl-recipes.md §3).

The trained modules are counted as the run builds them: each stage's settings resolved as `medsynapse train` resolves
them (runconfig.resolve: the model section, then the stage section's keys on top), so P_phi has Stage I's sizes,
the LoRA Stage II's rank and targets, A_psi Stage III's pooling (the recipe's default: attention), MLP width and
query width. P_phi's input width is `model.prior_dim`; when the file chooses `model.encoder_feature_level`, prior_dim
must be that level's width (model/encoders/sam3.py `level_channels`, from the encoder folder's config when it
exists, else SAM 3's published config) and an existing encoder folder must be set to that level.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Sam3Config

from medsynapse.config import ConfigError
from medsynapse.model.encoders.sam3 import SETTINGS_FILE, Sam3Settings, level_channels
from medsynapse.model.medsynapse import lora_target_regex
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    count_parameters,
)
from medsynapse.runconfig import STAGES, ModelSection, RunConfig, resolve

if TYPE_CHECKING:
    from transformers import Qwen3VLTextConfig

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-vl-8b": dict(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False),
    "qwen3-vl-4b": dict(
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                           deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True),
}
# Published encoder sizes (meta-device counts of the transformers classes, qwen3vl-recipes.md §10).
ENCODER_PARAMS = {"sam3": 840_000_000, "sam3-vision": 454_000_000, "sam-vit-b": 94_000_000, "tiny_seg": 60_000}
SAM3_KINDS = ("sam3", "sam3-vision")  # the encoder kinds whose prior-token level `encoder_feature_level` names


@dataclass
class RealSizeConfig(ModelSection):
    """A run file's `model` section (runconfig.ModelSection) plus what only the estimate needs."""

    weight_bytes: int = 2  # bf16 frozen weights
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    stage3: dict = field(default_factory=dict)
    source: str = "config"  # the file it was read from (error messages)


def from_run(run) -> RealSizeConfig:
    """The real-size report's settings from a run config (runconfig.RunConfig): its model section and stages."""
    return RealSizeConfig(**dataclasses.asdict(run.model), stage1=dict(run.stage1), stage2=dict(run.stage2),
                          stage3=dict(run.stage3), source=run.source)


def resolved_stages(config: RealSizeConfig) -> dict:
    """Each stage's recipe config (Stage1Config, Stage2Config, Stage3Config) as `medsynapse train` resolves it."""
    model = ModelSection(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ModelSection)})
    run = RunConfig(model=model, stage1=dict(config.stage1), stage2=dict(config.stage2), stage3=dict(config.stage3),
                    source=config.source)
    return {stage: resolve(run, stage) for stage in STAGES}


def prior_dim(config: RealSizeConfig) -> int:
    """P_phi's input width: `prior_dim`, which must be the width of `encoder_feature_level` when the file names one
    (and an existing encoder folder must be set to that level); without a level, `prior_dim` as given."""
    level = config.encoder_feature_level
    if not level:
        return config.prior_dim
    where = f"{config.source}.model"
    if config.encoder_kind not in SAM3_KINDS:
        raise ConfigError(f"{where}.encoder_feature_level: names a SAM 3 level, but encoder_kind is "
                          f"{config.encoder_kind!r} (SAM 3: {list(SAM3_KINDS)})")
    folder = Path(config.encoder).expanduser() if config.encoder else None
    vision = Sam3Config().vision_config  # SAM 3's published sizes when the folder is absent
    if folder is not None and (folder / "config.json").is_file():
        if json.loads((folder / "config.json").read_text()).get("model_type") != "sam3":
            raise ConfigError(f"{where}.encoder_feature_level: {folder} is not a SAM 3 (Sam3Model) folder")
        vision = Sam3Config.from_pretrained(folder).vision_config
        chosen = Sam3Settings.load(folder).feature_level
        if chosen != level:
            raise ConfigError(f"{where}.encoder_feature_level: {level!r}, but the encoder folder {folder} computes "
                              f"{chosen!r} (its {SETTINGS_FILE} or the code default)")
    try:
        channels = level_channels(vision, level)
    except ValueError as err:
        raise ConfigError(f"{where}.encoder_feature_level: {err}") from None
    if config.prior_dim != channels:
        raise ConfigError(f"{where}.prior_dim: {config.prior_dim}, but encoder_feature_level {level!r} has "
                          f"{channels} channels; set prior_dim: {channels}")
    return channels


def trained_modules(config: RealSizeConfig, hidden: int) -> dict:
    """The settings of what each stage trains: P_phi (Stage I), the LoRA (Stage II), A_psi (Stage III; its N and
    image count are P_phi's, as Stage III builds it from the teacher's sampler)."""
    s1, s2, s3 = resolved_stages(config).values()
    sampler = SamplerConfig(prior_dim=prior_dim(config), hidden_size=hidden, n_memory=s1.n_memory,
                            width=s1.sampler_width, layers=s1.sampler_layers, heads=s1.sampler_heads,
                            max_images=s1.max_images)
    autonomous = AutonomousConfig(hidden_size=hidden, n_memory=s1.n_memory, mlp_hidden=s3.mlp_hidden,
                                  pooling=s3.pooling, attention_dim=s3.attention_dim, max_images=s1.max_images)
    return {"sampler": sampler, "lora": {"r": s2.lora_r, "targets": list(s2.lora_targets)}, "autonomous": autonomous}


def vlm_folder(config: RealSizeConfig) -> Path | None:
    """The VLM folder when it exists (its config.json is counted), else None (the architecture preset is)."""
    folder = Path(config.vlm).expanduser() if config.vlm else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def build_meta_vlm(config: RealSizeConfig) -> Qwen3VLForConditionalGeneration:
    folder = vlm_folder(config)
    if folder is not None:
        vlm_config = Qwen3VLConfig.from_pretrained(folder)
    else:
        if config.architecture not in PRESETS:
            raise ValueError(f"unknown architecture {config.architecture!r}; known: {sorted(PRESETS)}")
        vlm_config = Qwen3VLConfig(**PRESETS[config.architecture])
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(vlm_config)


def lora_parameters(vlm, r: int, targets: list[str]) -> int:
    """r * (in + out) for every Linear the LoRA regex hits (what peft would add), counted without building it."""
    import re

    pattern = re.compile(lora_target_regex(targets))
    total = 0
    for name, module in vlm.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            total += r * (module.in_features + module.out_features)
    return total


def describe(config: RealSizeConfig, trained: dict, hidden: int) -> dict[str, str]:
    """What each counted module is, in words (the report's `settings`)."""
    s, a, lora = trained["sampler"], trained["autonomous"], trained["lora"]
    level = f" ({config.encoder_feature_level})" if config.encoder_feature_level else ""
    pooling = f"{a.pooling} pooling" + (f" (query width {a.attention_dim})" if a.pooling == "attention" else "")
    return {"vlm": f"{vlm_folder(config) or config.architecture} (frozen)",
            "encoder": f"{config.encoder_kind} (published size, frozen)",
            "sampler": f"P_phi: prior_dim {s.prior_dim}{level} -> {hidden}, width {s.width}, {s.layers} layers, "
                       f"{s.heads} heads, N {s.n_memory}, max_images {s.max_images}",
            "lora": f"r {lora['r']} on {'/'.join(lora['targets'])}",
            "autonomous": f"A_psi: {pooling}, MLP width {a.mlp_hidden or hidden}, N {a.n_memory}, "
                          f"max_images {a.max_images}"}


def report(config: RealSizeConfig) -> dict:
    vlm = build_meta_vlm(config)
    hidden = cast("Qwen3VLTextConfig", vlm.config.text_config).hidden_size
    trained = trained_modules(config, hidden)
    with torch.device("meta"):
        sampler = DiagnosticMemorySampler(trained["sampler"])
        autonomous = AutonomousMemoryModule(trained["autonomous"])
    counts = {"vlm": count_parameters(vlm), "encoder": ENCODER_PARAMS.get(config.encoder_kind, 0),
              "sampler": count_parameters(sampler),
              "lora": lora_parameters(vlm, trained["lora"]["r"], trained["lora"]["targets"]),
              "autonomous": count_parameters(autonomous)}
    settings = describe(config, trained, hidden)
    stages = {
        "stage1": (["sampler"], ["vlm", "encoder"]),
        "stage2": (["lora"], ["vlm", "encoder", "sampler"]),
        "stage3": (["autonomous"], ["vlm", "lora", "encoder", "sampler"]),
        "inference (student)": ([], ["vlm", "lora", "autonomous"]),
    }
    rows = {}
    for stage, (trainable, frozen) in stages.items():
        n_train = sum(counts[k] for k in trainable)
        n_frozen = sum(counts[k] for k in frozen)
        # frozen weights at weight_bytes; trainable: fp32 master weights + grads + two Adam moments = 16 bytes
        gib = (n_frozen * config.weight_bytes + n_train * 16) / 2**30
        rows[stage] = {"trainable": {k: counts[k] for k in trainable}, "frozen": {k: counts[k] for k in frozen},
                       "trainable_total": n_train, "frozen_total": n_frozen, "weights_and_optimizer_gib": gib}
    return {"architecture": config.architecture, "hidden_size": hidden, "parameters": counts, "settings": settings,
            "stages": rows}


def format_report(result: dict) -> str:
    counts = result["parameters"]
    lines = [f"{result['architecture']} (hidden {result['hidden_size']}) on the meta device",
             "", "| module | parameters | counted as |", "|---|---|---|"]
    lines += [f"| {name} | {value / 1e6:,.1f} M | {result['settings'][name]} |" for name, value in counts.items()]
    lines += ["", "| stage | trainable | frozen | weights + grads + Adam (GiB, excl. activations) |",
              "|---|---|---|---|"]
    for stage, row in result["stages"].items():
        trainable = ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in row["trainable"].items()) or "—"
        lines.append(f"| {stage} | {trainable} | {row['frozen_total'] / 1e9:,.2f} B | "
                     f"{row['weights_and_optimizer_gib']:.1f} |")
    return "\n".join(lines)


def main(config: RealSizeConfig, as_json: bool = False) -> str:
    result = report(config)
    return json.dumps(result, indent=2) if as_json else format_report(result)
