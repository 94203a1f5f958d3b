"""`medsynapse inspect`: build a real-size MedSynapse-V on the meta device (no weights, no memory) and report, per
stage, trainable and frozen parameters and a training-memory estimate.

The VLM comes from the folder's config.json when the folder exists, else from a built-in architecture preset taken
from the published Qwen3-VL config.json files (qwen3vl-recipes.md §3).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from medsynapse.model.medsynapse import lora_target_regex
from medsynapse.model.memory import (
    AutonomousConfig,
    AutonomousMemoryModule,
    DiagnosticMemorySampler,
    SamplerConfig,
    count_parameters,
)
from medsynapse.runconfig import ModelSection

PRESETS = {
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


@dataclass
class RealSizeConfig(ModelSection):
    """A run file's `model` section (runconfig.ModelSection) plus what only the estimate needs."""

    weight_bytes: int = 2  # bf16 frozen weights
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    stage3: dict = field(default_factory=dict)


def from_run(run) -> RealSizeConfig:
    """The real-size report's settings from a run config (runconfig.RunConfig): its model section and stages."""
    return RealSizeConfig(**dataclasses.asdict(run.model), stage1=dict(run.stage1), stage2=dict(run.stage2),
                          stage3=dict(run.stage3))


def build_meta_vlm(config: RealSizeConfig) -> Qwen3VLForConditionalGeneration:
    folder = Path(config.vlm).expanduser() if config.vlm else None
    if folder is not None and (folder / "config.json").is_file():
        vlm_config = Qwen3VLConfig.from_pretrained(folder)
    else:
        if config.architecture not in PRESETS:
            raise ValueError(f"unknown architecture {config.architecture!r}; known: {sorted(PRESETS)}")
        vlm_config = Qwen3VLConfig(**PRESETS[config.architecture])
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(vlm_config)


def lora_parameters(vlm, config: RealSizeConfig) -> int:
    """r * (in + out) for every Linear the LoRA regex hits (what peft would add), counted without building it."""
    import re

    pattern = re.compile(lora_target_regex(config.lora_targets))
    total = 0
    for name, module in vlm.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            total += config.lora_r * (module.in_features + module.out_features)
    return total


def report(config: RealSizeConfig) -> dict:
    vlm = build_meta_vlm(config)
    hidden = vlm.config.text_config.hidden_size
    with torch.device("meta"):
        sampler = DiagnosticMemorySampler(SamplerConfig(prior_dim=config.prior_dim, hidden_size=hidden,
                                                        n_memory=config.n_memory, width=config.sampler_width,
                                                        layers=config.sampler_layers, heads=config.sampler_heads,
                                                        max_images=config.max_images))
        autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=config.n_memory,
                                                             mlp_hidden=config.autonomous_mlp_hidden))
    counts = {"vlm": count_parameters(vlm), "encoder": ENCODER_PARAMS.get(config.encoder_kind, 0),
              "sampler": count_parameters(sampler), "lora": lora_parameters(vlm, config),
              "autonomous": count_parameters(autonomous)}
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
    return {"architecture": config.architecture, "hidden_size": hidden, "parameters": counts, "stages": rows}


def format_report(result: dict) -> str:
    counts = result["parameters"]
    lines = [f"{result['architecture']} (hidden {result['hidden_size']}) on the meta device",
             "", "| module | parameters |", "|---|---|"]
    lines += [f"| {name} | {value / 1e6:,.1f} M |" for name, value in counts.items()]
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
