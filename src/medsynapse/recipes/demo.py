"""`medsynapse demo`: the whole pipeline on SynthMed, on a laptop CPU.

data -> tiny Qwen3-VL (built offline) -> base-VLM preparation -> prior encoder (trained on masks, frozen)
-> Stage I -> Stage II -> evaluation of base vs each stage (and each stage with the counterfactual memory) on the
held-out test split.
Data, the tiny VLMs and the encoder are cached (keyed by the settings that shape them); stages are always re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medsynapse.data.schema import read_samples
from medsynapse.data.synthmed import SYNTHMED_VERSION, corpus_lines, generate_split
from medsynapse.eval.efficiency import compare_latency, measure_isolated
from medsynapse.eval.report import efficiency_table, plot_accuracy, stage_table, type_table, write_json
from medsynapse.eval.vqa import evaluate
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm
from medsynapse.recipes.prepare_base import BasePrepConfig, prepare_base
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2
from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3
from medsynapse.recipes.train_encoder import EncoderTrainConfig, train_encoder

ENCODER_VERSION = 2  # bump when the tiny encoder's architecture or training changes


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    cache_dir: str = ""  # default: $MEDSYNAPSE_CACHE or ~/.cache/medsynapse
    seed: int = 0
    image_size: int = 64
    vlm_resolution: int = 128  # the tiny VLM sees each scan at 128 px: 4x4 merged visual tokens (A_psi: 16 slots)
    train_images: int = 1000
    test_images: int = 150
    base_steps: int = 500
    encoder_steps: int = 250
    stage1: dict = field(default_factory=lambda: {
        "lr": 1e-3, "max_steps": 500, "batch_size": 32, "n_memory": 16, "sampler_width": 128, "save_every": 100,
        "warmup_ratio": 0.05, "answer_types": ["yes_no", "multiple_choice", "open"], "loss_reduction": "sample"})
    stage2: dict = field(default_factory=lambda: {
        "lr": 3e-4, "max_steps": 250, "batch_size": 16, "group_size": 4, "lora_r": 16, "lora_alpha": 32,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "causal_clip": 0.9, "causal_gate": "correct",
        "families": ["lesion"], "answer_types": ["yes_no", "multiple_choice"], "save_every": 100})
    stage3: dict = field(default_factory=lambda: {
        "lr": 3e-3, "max_steps": 500, "batch_size": 32, "max_new_tokens": 6, "families": ["lesion"],
        "save_every": 100})
    efficiency_samples: int = 60  # timed samples per model (after 3 warm-up); medians are noisy below ~50 here
    eval_batch_size: int = 64
    threads: int = 0  # 0 = torch default


def _cache_root(config: DemoConfig) -> Path:
    return Path(config.cache_dir or os.environ.get("MEDSYNAPSE_CACHE") or Path.home() / ".cache" / "medsynapse")


def _key(*parts: object) -> str:
    """Content key of a cached artefact: everything that shapes it, code versions included."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(folder: Path, build) -> Path:
    """Run `build(tmp)` once; the folder only appears (atomically renamed) when the build finished."""
    if (folder / ".done").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".done").write_text("ok")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def run_demo(config: DemoConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    cache = _cache_root(config)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timing[name] = round(time.perf_counter() - start, 2)
        return value

    def make_data(tmp: Path) -> None:
        generate_split(tmp, "train", config.train_images, config.seed, config.image_size)
        generate_split(tmp, "test", config.test_images, config.seed, config.image_size)

    spec = TinyVLMSpec(image_size=config.image_size, vlm_resolution=config.vlm_resolution, seed=config.seed)
    data_key = _key(SYNTHMED_VERSION, config.seed, config.image_size, config.train_images, config.test_images)
    vlm_key = _key(data_key, asdict(spec))
    data = timed("data", lambda: _cached(cache / f"data-{data_key}", make_data))
    train_file = str(data / "train.jsonl")

    def make_vlm(tmp: Path) -> None:
        build_tiny_vlm(tmp, corpus_lines(), spec)

    vlm_init = timed("build_vlm", lambda: _cached(cache / f"vlm_init-{vlm_key}", make_vlm))

    def make_base(tmp: Path) -> None:
        prepare_base(BasePrepConfig(vlm=str(vlm_init), train_file=train_file, output_dir=str(tmp),
                                    steps=config.base_steps, seed=config.seed))

    vlm_base = timed("base_prep", lambda: _cached(cache / f"vlm_base-{_key(vlm_key, config.base_steps)}", make_base))

    def make_encoder(tmp: Path) -> None:
        _, info = train_encoder(EncoderTrainConfig(train_file=train_file, output_dir=str(tmp),
                                                   image_size=config.image_size, steps=config.encoder_steps,
                                                   seed=config.seed))
        (tmp / "train_metrics.json").write_text(json.dumps(info))

    encoder_key = _key(data_key, ENCODER_VERSION, config.encoder_steps)
    encoder = timed("encoder", lambda: _cached(cache / f"encoder-{encoder_key}", make_encoder))
    encoder_info = json.loads((encoder / "train_metrics.json").read_text())

    stage1_dir = out / "stage1"
    shutil.rmtree(stage1_dir, ignore_errors=True)
    stage1_cfg = Stage1Config(vlm=str(vlm_base), encoder=str(encoder), train_file=train_file,
                              output_dir=str(stage1_dir), seed=config.seed, **config.stage1)
    timed("stage1", lambda: train_stage1(stage1_cfg))

    stage2_dir = out / "stage2"
    shutil.rmtree(stage2_dir, ignore_errors=True)
    stage2_cfg = Stage2Config(model=str(stage1_dir), train_file=train_file, output_dir=str(stage2_dir),
                              seed=config.seed, **config.stage2)
    timed("stage2", lambda: train_stage2(stage2_cfg))

    stage3_dir = out / "stage3_student"
    shutil.rmtree(stage3_dir, ignore_errors=True)
    stage3_cfg = Stage3Config(model=str(stage2_dir), train_file=train_file, output_dir=str(stage3_dir),
                              seed=config.seed, **config.stage3)
    timed("stage3", lambda: train_stage3(stage3_cfg))

    test = [s for s in read_samples(data / "test.jsonl") if s.family == "lesion" and s.answer_type != "caption"]
    train_n = len([s for s in read_samples(data / "train.jsonl") if s.answer_type != "caption"])
    evaluations: dict[str, dict] = {}

    def evaluate_stage(name: str, folder: Path, counterfactual: bool) -> dict:
        model = MedSynapseV.from_pretrained(folder, merge_adapter=True)
        result = timed(f"eval_{name}", lambda: evaluate(model, test, batch_size=config.eval_batch_size,
                                                        desc=f"eval {name}"))
        evaluations[name] = result
        row = {"accuracy": result["accuracy"], "n": result["n"], "unparseable": result["unparseable"],
               "by_question_type": result["by_question_type"]}
        if counterfactual:
            cf = timed(f"eval_{name}_cf", lambda: evaluate(model, test, branch="counterfactual",
                                                           batch_size=config.eval_batch_size, desc=f"eval {name} cf"))
            evaluations[f"{name}_counterfactual"] = cf
            row["counterfactual_accuracy"] = cf["accuracy"]
        return row

    stages = {"base": evaluate_stage("base", vlm_base, False), "stage1": evaluate_stage("stage1", stage1_dir, True),
              "stage2": evaluate_stage("stage2", stage2_dir, True),
              "stage3_student": evaluate_stage("stage3_student", stage3_dir, False)}
    # The Stage III teacher is the Stage II model with its privileged memory: same weights, same answers.
    stages["stage3_teacher"] = {k: stages["stage2"][k] for k in ("accuracy", "n", "unparseable", "by_question_type")}
    stages["stage3_student"] = stages.pop("stage3_student")

    # Latency side by side in one process; memory of each model in a fresh process (clean peak).
    folders = {"base": vlm_base, "stage3_teacher": stage2_dir, "stage3_student": stage3_dir}
    timed_ids = [s.id for s in test[:config.efficiency_samples + 3]]
    latency = timed("efficiency_latency", lambda: compare_latency(
        {name: (lambda f=f: MedSynapseV.from_pretrained(f, merge_adapter=True)) for name, f in folders.items()},
        test, n_timed=config.efficiency_samples))
    efficiency = {}
    for name, folder in folders.items():
        isolated = timed(f"efficiency_memory_{name}", lambda f=folder: measure_isolated(
            str(f), str(data / "test.jsonl"), timed_ids, n_timed=config.efficiency_samples))
        efficiency[name] = {"ms_per_sample": latency[name], "peak_mem_mb": isolated["peak_mem_mb"],
                            "ms_per_sample_isolated_run": isolated["ms_per_sample"],
                            "memory_measure": isolated["memory_measure"], "n_timed": config.efficiency_samples}
    causal = json.loads((stage2_dir / "causal_reward_summary.json").read_text())
    stages["stage2"].update({k: causal[k] for k in ("mean_causal_reward_correct", "mean_causal_reward_wrong")})

    results = {
        "seed": config.seed,
        "splits": {"train": train_n, "test": len(test)},
        "stages": stages,
        "encoder": encoder_info,
        "stage2_causal_reward": causal,
        "efficiency": efficiency,
        "timing_s": {**timing, "total": round(time.perf_counter() - t0, 2)},
        "config": asdict(config),
    }
    for name, result in evaluations.items():
        with (out / f"predictions_{name}.jsonl").open("w") as handle:
            for p in result["predictions"]:
                handle.write(json.dumps(p) + "\n")
    write_json(out / "results.json", results)
    report = "\n\n".join([
        f"# MedSynapse demo (SynthMed, seed {config.seed})",
        f"Held-out test split: {len(test)} lesion questions on {config.test_images} images never seen in training.",
        stage_table(results),
        f"Stage II mean causal reward (last 20 % of training): correct rollouts "
        f"{_fmt(causal['mean_causal_reward_correct'])}, wrong rollouts {_fmt(causal['mean_causal_reward_wrong'])}.",
        f"## Efficiency (batch 1, {config.efficiency_samples} timed samples, same questions and tokens)",
        efficiency_table(results),
        "## By question type",
        type_table(results),
        f"Wall time: {results['timing_s']['total']:.1f} s ({json.dumps(timing)})\n"])
    (out / "report.md").write_text(report)
    plot_accuracy(results, out / "accuracy.png")
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
