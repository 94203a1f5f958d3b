"""Real-size, random-weight check for GPU users: a run file's model (Qwen3-VL-8B in bf16) with MedSynapse-V's modules.

Reads a run file (default configs/medsynapse-v-8b.yaml: its architecture, memory and LoRA sizes, and each stage's
settings, resolved by the code the recipes use) and measures, on one GPU: (1) ms/sample and peak memory of base vs
teacher (SAM 3-sized vision trunk + P_phi) vs encoder-free student (A_psi) inference, batch 1, a 448 px image, exactly
32 generated tokens; (2) one optimisation step of each stage at the file's settings: Stage I (P_phi, next-token loss on
`stage1.batch_size` answers), Stage II (`batch_size` prompts x G rollouts of up to `max_new_tokens`, sampled at the
file's temperature / top-p, factual + counterfactual scoring, clipped GRPO update of the LoRA) and Stage III
(on-policy student rollouts + JSD); a step that runs out of memory is retried with half the batch until one fits,
and the batch that fitted is reported; (3) the chunked generalized JSD at the full 151,936-token vocabulary against
the naive formula. Weights are random (no download): speed and memory are representative, answers are not.
Without a GPU it builds the `--cpu-config` run (default configs/medsynapse-v-4b.yaml) on the meta device and prints the
parameter counts and the memory estimate per stage (`medsynapse inspect`'s, plus the rollouts' KV cache).
Usage: python benchmarks/gpu_realsize.py [--config RUN.yaml] [--set stage2.max_new_tokens=256 ...]
       [--preset tiny] [--out results.json]   (tiny: real vocabulary, small everything else; CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build(preset: str, device: str, dtype: torch.dtype, model_section=None):
    """Base, teacher and student on one random-weight VLM; P_phi and A_psi sized by the run file's `model` section
    (runconfig.ModelSection) except at the tiny preset."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from medsynapse.data.synthmed import corpus_lines
    from medsynapse.inspection import PRESETS
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.memory import (
        AutonomousConfig,
        AutonomousMemoryModule,
        DiagnosticMemorySampler,
        SamplerConfig,
    )
    from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm
    from medsynapse.model.vlm import load_processor

    # A small local tokenizer + processor (448 px -> 28x28 patches -> 196 visual tokens); its ids fit any vocabulary.
    folder = build_tiny_vlm(tempfile.mkdtemp(), corpus_lines(), TinyVLMSpec(vlm_resolution=448))
    processor = load_processor(folder)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    if preset == "tiny":  # CPU smoke test of this script: real vocabulary, small everything else
        arch = json.loads(json.dumps(PRESETS["qwen3-vl-8b"]))
        arch["text_config"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": [12, 10, 10], "mrope_interleaved": True})
        arch["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                                     deepstack_visual_indexes=[0])
        prior_dim, width, trunk = 64, 64, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=128, image_size=224, patch_size=14)
    else:
        arch = PRESETS[preset]
        prior_dim, width, trunk = 1024, 1024, dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16,
                                                   intermediate_size=4736, image_size=1008, patch_size=14)
    config = Qwen3VLConfig(**arch, **ids)
    config.text_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        vlm = Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    vlm.generation_config.eos_token_id = tok.eos_token_id
    vlm.generation_config.pad_token_id = tok.pad_token_id
    hidden = config.text_config.hidden_size
    sizes = dict(width=width, heads=8 if width >= 512 else 4)
    n_memory, mlp_hidden = 16, 0
    if model_section is not None:
        n_memory, mlp_hidden = model_section.n_memory, model_section.autonomous_mlp_hidden
        if preset != "tiny":
            sizes = dict(width=model_section.sampler_width, heads=model_section.sampler_heads,
                         layers=model_section.sampler_layers)
    with torch.device(device):
        sampler = DiagnosticMemorySampler(SamplerConfig(prior_dim=prior_dim, hidden_size=hidden, n_memory=n_memory,
                                                        **sizes)).to(dtype).eval()
        autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden, n_memory=n_memory,
                                                             mlp_hidden=mlp_hidden)).to(dtype).eval()
    encoder = SamTrunkEncoder(trunk, device, dtype)
    base = MedSynapseV(vlm, processor, vlm_path=str(folder))
    teacher = MedSynapseV(vlm, processor, encoder=encoder, sampler=sampler, vlm_path=str(folder))
    student = MedSynapseV(vlm, processor, autonomous=autonomous, vlm_path=str(folder))
    return {"base": base, "teacher": teacher, "student": student, "vlm": vlm}


class SamTrunkEncoder(torch.nn.Module):
    """A SAM 3-sized ViT trunk (transformers `Sam3ViTModel`, random weights) standing in for MedSAM3's cost:
    tokens = the final trunk features (72 x 72 x 1024 at 1008 px); region = the 5 % most active tokens."""

    def __init__(self, trunk: dict, device: str, dtype: torch.dtype):
        super().__init__()
        from transformers import Sam3ViTConfig, Sam3ViTModel

        cfg = Sam3ViTConfig(window_size=24 if trunk["image_size"] >= 1008 else 4,
                            global_attn_indexes=[7, 15, 23, 31] if trunk["num_hidden_layers"] >= 32 else [1], **trunk)
        with torch.device(device):
            self.trunk = Sam3ViTModel(cfg).to(dtype).eval()
        self.size, self.dtype, self.feature_dim = trunk["image_size"], dtype, trunk["hidden_size"]

    def encode(self, images):
        from medsynapse.model.encoders import PriorOutput

        device = next(self.trunk.parameters()).device
        # resize + normalise (mean = std = 0.5), written without torchvision
        pixels = torch.stack([torch.from_numpy(np.asarray(img.convert("RGB").resize((self.size, self.size)),
                                                          dtype=np.float32)) for img in images])
        pixels = ((pixels / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).to(device, self.dtype)
        with torch.no_grad():
            feats = self.trunk(pixel_values=pixels).last_hidden_state
        if feats.dim() == 4:
            feats = feats.flatten(1, 2)
        side = int(round(feats.shape[1] ** 0.5))
        energy = feats.float().norm(dim=-1)
        region = energy >= energy.quantile(0.95, dim=1, keepdim=True)
        return PriorOutput(feats, (side, side), region)


def timed_inference(models: dict, image: Image.Image, question: str, n: int, tokens: int) -> dict:
    out = {}
    for name in ("base", "teacher", "student"):
        model = models[name]
        _peak_reset()
        times = []
        for index in range(n + 2):
            _sync()
            start = time.perf_counter()
            model.answer([image], [question], max_new_tokens=tokens, min_new_tokens=tokens)
            _sync()
            if index >= 2:
                times.append((time.perf_counter() - start) * 1000)
        out[name] = {"ms_per_sample": statistics.median(times), "peak_mem_gib": _peak_gib()}
    return out


def batched_inference(models: dict, image: Image.Image, question: str, batch: int, tokens: int) -> dict:
    """ms per question answering `batch` questions in one left-padded batch, as `medsynapse eval` does."""
    out = {}
    for name in ("base", "teacher"):
        _peak_reset()
        times = []
        for index in range(3):
            _sync()
            start = time.perf_counter()
            models[name].answer([image] * batch, [question] * batch, max_new_tokens=tokens, min_new_tokens=tokens)
            _sync()
            if index >= 1:
                times.append((time.perf_counter() - start) * 1000 / batch)
        out[name] = {"batch": batch, "ms_per_sample": statistics.median(times), "peak_mem_gib": _peak_gib()}
    return out


def stage2_step(models: dict, image: Image.Image, question: str, prompts: int, group: int, tokens: int,
                sampling: str = "keyed", temperature: float = 1.0, top_p: float = 0.95, lora_r: int = 64,
                lora_alpha: int = 128, lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj"),
                lr: float = 1e-5, lambda_causal: float = 0.5) -> dict:
    from peft import LoraConfig, get_peft_model

    from medsynapse.model.medsynapse import lora_target_regex

    teacher = models["teacher"]
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                      target_modules=lora_target_regex(list(lora_targets)))
    teacher.vlm = get_peft_model(teacher.vlm, lora)
    try:
        return _stage2_steps(teacher, image, question, prompts, group, tokens, sampling, temperature, top_p, lr,
                             lambda_causal)
    finally:
        teacher.vlm = teacher.vlm.unload()  # drop the LoRA layers (also after an OOM) so a retry starts plain


def _stage2_steps(teacher, image, question, prompts, group, tokens, sampling, temperature, top_p, lr,
                  lambda_causal) -> dict:
    from medsynapse.data.schema import Sample
    from medsynapse.model.sampling import row_keys
    from medsynapse.model.vlm import completion_logprobs, select_features, vision_features
    from medsynapse.objectives.grpo import clipped_policy_loss, group_advantages
    from medsynapse.objectives.rewards import accuracy_rewards, causal_rewards
    from medsynapse.recipes.stage2_ccr import Stage2Config, factual_and_counterfactual_logprobs, generate_rollouts

    trainable = [p for p in teacher.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    config = Stage2Config(temperature=temperature, top_p=top_p, max_new_tokens=tokens, rollout_sampling=sampling)
    sample = Sample(id="x", images=["x"], question=question, answer="yes", answer_type="yes_no")
    device = next(teacher.vlm.parameters()).device
    results = []
    for _ in range(2):  # the first step warms up
        _peak_reset()
        _sync()
        start = time.perf_counter()
        items = [teacher.prompts.encode([image], question) for _ in range(prompts)]
        batch0 = teacher.prompts.collate(items, with_answers=False).to(device)
        with torch.no_grad():
            prior = teacher.prior([image] * prompts)
            memory, memory_cf = teacher.memory(prior), teacher.memory(prior, "counterfactual")
            features = vision_features(teacher.vlm, batch0)
        rows = [r for r in range(prompts) for _ in range(group)]
        batch, feats = batch0.select(rows), select_features(features, batch0.image_rows(rows))
        teacher.vlm.eval()
        keys = row_keys(0, len(results), list(range(prompts)), group)
        rollouts = generate_rollouts(teacher, batch, memory[rows], feats, config, keys)
        r_acc = accuracy_rewards(rollouts.texts, [sample] * len(rows)).to(device)
        logp_old, logp_f, logp_cf = factual_and_counterfactual_logprobs(
            teacher.vlm, batch, memory[rows], memory_cf[rows], rollouts, feats, teacher.latent_id, 1.0)
        rewards = r_acc + lambda_causal * causal_rewards(logp_f, logp_cf, rollouts.mask)
        advantages = group_advantages(rewards.float(), group)
        teacher.vlm.train()
        logp = completion_logprobs(teacher.vlm, batch, memory[rows], rollouts.tokens, rollouts.mask,
                                   teacher.latent_id, feats)
        loss = clipped_policy_loss(logp, logp_old, advantages, rollouts.mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        results.append({"step_s": time.perf_counter() - start, "generate_s": rollouts.seconds,
                        "generated_tokens": int(rollouts.mask.sum()), "peak_mem_gib": _peak_gib()})
    return {"prompts": prompts, "group": group, "max_new_tokens": tokens, "sampling": sampling,
            "lora_params": sum(p.numel() for p in trainable), **results[-1]}


def jsd_full_vocab(device: str, positions: int, vocab: int) -> dict:
    from medsynapse.objectives.jsd import generalized_jsd

    out = {}
    for name in ("ours_chunked", "naive"):
        torch.manual_seed(0)
        student = torch.randn(positions, vocab, device=device).requires_grad_(True)
        teacher = torch.randn(positions, vocab, device=device)
        _peak_reset()
        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        _sync()
        start = time.perf_counter()
        if name == "ours_chunked":
            loss = generalized_jsd(student, teacher, beta=0.5, chunk_size=128)
        else:
            s, t = student.log_softmax(-1), teacher.log_softmax(-1)
            m = torch.logsumexp(torch.stack([s + torch.log(torch.tensor(0.5)), t + torch.log(torch.tensor(0.5))]), 0)
            loss = (0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)).mean()
        loss.backward()
        _sync()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else float("nan")
        out[name] = {"loss": loss.item(), "seconds": time.perf_counter() - start, "peak_extra_gib": extra}
        del student, teacher, loss
    return out


def _halving(run_step, batch: int) -> dict:
    """`run_step(batch)`, halving the batch after each CUDA out-of-memory until one fits; records what fitted."""
    wanted = batch
    while True:
        try:
            result = run_step(batch)
            return {**result, "batch_requested": wanted, "batch_fitted": batch}
        except torch.OutOfMemoryError:
            _peak_reset()
            if batch == 1:
                return {"batch_requested": wanted, "batch_fitted": 0, "error": "out of memory at batch 1"}
            print(f"out of memory at batch {batch}; trying {batch // 2}", flush=True)
            batch //= 2


def stage1_step(models: dict, image: Image.Image, question: str, batch: int, answer_words: int, lr: float) -> dict:
    """One Stage I step: P_phi trained by the next-token loss on answers of ~answer_words words (VLM frozen)."""
    from medsynapse.objectives.ntp import answer_nll

    teacher = models["teacher"]
    sampler = teacher.sampler.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(sampler.parameters(), lr=lr)
    device = next(teacher.vlm.parameters()).device
    answer = " ".join(["the lesion is in the left lower lobe"] * max(1, answer_words // 8))
    results = []
    for _ in range(2):  # the first step warms up
        _peak_reset()
        _sync()
        start = time.perf_counter()
        prompt = teacher.prompts.collate([teacher.prompts.encode([image], question, answer) for _ in range(batch)])
        prompt = prompt.to(device)
        with torch.no_grad():
            prior = teacher.prior([image] * batch)
        memory = sampler(prior.tokens, prior.grid)
        loss = answer_nll(teacher.forward(prompt, memory, labels=None).logits, prompt.labels, "sample")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        results.append({"step_s": time.perf_counter() - start, "sequence_tokens": int(prompt.input_ids.shape[1]),
                        "peak_mem_gib": _peak_gib()})
    sampler.eval().requires_grad_(False)
    return results[-1]


def stage3_step(models: dict, image: Image.Image, question: str, batch: int, tokens: int, settings) -> dict:
    """One Stage III step: on-policy student rollouts (A_psi memory), teacher and student scored, JSD from hidden
    states (fused, as the 8B config runs it) or from full logits, update of A_psi."""
    from medsynapse.model.memory import AutonomousConfig, AutonomousMemoryModule
    from medsynapse.model.sampling import row_keys, sampling_kwargs
    from medsynapse.model.vlm import completion_mask, completion_outputs, core_vlm, vision_features
    from medsynapse.objectives.jsd import generalized_jsd, generalized_jsd_from_hidden

    teacher = models["teacher"]
    core = core_vlm(teacher.vlm)
    device = next(teacher.vlm.parameters()).device
    dtype = next(teacher.vlm.parameters()).dtype
    with torch.device(device):
        student = AutonomousMemoryModule(AutonomousConfig(hidden_size=core.config.text_config.hidden_size,
                                                          n_memory=teacher.n_memory)).to(dtype).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr)
    merge = core.config.vision_config.spatial_merge_size
    results = []
    for step in range(2):  # the first step warms up
        _peak_reset()
        _sync()
        start = time.perf_counter()
        prompt = teacher.prompts.collate([teacher.prompts.encode([image], question) for _ in range(batch)],
                                         with_answers=False).to(device)
        with torch.no_grad():
            features = vision_features(teacher.vlm, prompt)
            teacher_memory = teacher.memory(teacher.prior([image] * batch))
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in prompt.image_grid_thw.tolist()]
        student_memory = student(features.pooler_output, grids, prompt.images_per_sample)
        keys = row_keys(0, step, list(range(batch)))
        generated = teacher.generate(prompt, student_memory.detach(), max_new_tokens=tokens, min_new_tokens=tokens,
                                     features=features, **sampling_kwargs(keys, settings.rollout_sampling,
                                                                          settings.sample_temperature, settings.top_p))
        mask = completion_mask(generated, teacher.prompts.eos_id)
        with torch.no_grad():
            teacher_out = completion_outputs(teacher.vlm, prompt, teacher_memory, generated, mask, teacher.latent_id,
                                             features, hidden=settings.fused_jsd)
        student_out = completion_outputs(teacher.vlm, prompt, student_memory, generated, mask, teacher.latent_id,
                                         features, hidden=settings.fused_jsd)
        items = max(float(mask.sum()), 1.0)
        if settings.fused_jsd:
            loss = generalized_jsd_from_hidden(student_out, teacher_out, core.lm_head.weight.detach(), mask,
                                               settings.beta, settings.jsd_temperature, settings.jsd_chunk_size, items)
        else:
            loss = generalized_jsd(student_out, teacher_out, mask, settings.beta, settings.jsd_temperature,
                                   settings.jsd_chunk_size, items)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        results.append({"step_s": time.perf_counter() - start, "generated_tokens": int(mask.sum()),
                        "fused_jsd": settings.fused_jsd, "peak_mem_gib": _peak_gib()})
    return results[-1]


def rollout_kv_cache_gib(vlm_config, rollouts: int, sequence: int, weight_bytes: int = 2) -> float:
    """Keys and values of every decoder layer for `rollouts` sequences of `sequence` tokens (what generation holds)."""
    text = vlm_config.text_config
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * weight_bytes
    return per_token * rollouts * sequence / 2**30


def meta_estimate(config_path: str, overrides: list[str]) -> dict:
    """No GPU: the run's parameters and weights + optimizer memory per stage on the meta device (`medsynapse
    inspect`), plus the Stage II / III rollouts' KV cache at the file's batch and generation length."""
    from medsynapse.inspection import build_meta_vlm, format_report, from_run, report
    from medsynapse.runconfig import read_run_config, resolve

    run = read_run_config(config_path, overrides)
    settings = from_run(run)
    result = report(settings)
    vlm_config = build_meta_vlm(settings).config
    prompt_tokens = 196 + 64 + settings.n_memory  # a 448 px image (14 x 14 merged tokens), the question, N slots
    s2, s3 = resolve(run, "stage2"), resolve(run, "stage3")
    result["rollouts"] = {
        "stage2": {"rollouts": s2.batch_size * s2.group_size, "max_new_tokens": s2.max_new_tokens,
                   "kv_cache_gib": rollout_kv_cache_gib(vlm_config, s2.batch_size * s2.group_size,
                                                        prompt_tokens + s2.max_new_tokens)},
        "stage3": {"rollouts": s3.batch_size, "max_new_tokens": s3.max_new_tokens,
                   "kv_cache_gib": rollout_kv_cache_gib(vlm_config, s3.batch_size, prompt_tokens + s3.max_new_tokens)},
        "prompt_tokens_assumed": prompt_tokens}
    print(format_report(result))
    for stage in ("stage2", "stage3"):
        row = result["rollouts"][stage]
        print(f"{stage}: KV cache of {row['rollouts']} rollouts x ({prompt_tokens} prompt + {row['max_new_tokens']} "
              f"new tokens), bf16: {row['kv_cache_gib']:.1f} GiB (estimate; activations of the scoring forward "
              "come on top)")
    return {"device": "meta (no GPU)", "config": config_path, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/medsynapse-v-8b.yaml", help="the run file measured on a GPU")
    parser.add_argument("--cpu-config", default="configs/medsynapse-v-4b.yaml",
                        help="the run file estimated on the meta device when there is no GPU")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-file overrides")
    parser.add_argument("--preset", default=None, choices=["qwen3-vl-8b", "qwen3-vl-4b", "tiny"],
                        help="default: the run file's model.architecture; tiny: a CPU smoke test of the steps")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--jsd-positions", type=int, default=1024)
    parser.add_argument("--out", default="gpu_realsize.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.preset != "tiny":
        report = meta_estimate(args.cpu_config, args.set)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
        return
    from medsynapse.runconfig import read_run_config, resolve

    run = read_run_config(args.config, args.set)
    stages = {stage: resolve(run, stage) for stage in ("stage1", "stage2", "stage3")}
    preset = args.preset or run.model.architecture
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    models = build(preset, device, dtype, run.model)
    report = {"preset": preset, "config": args.config, "overrides": args.set,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "build_s": time.perf_counter() - t0}
    print(json.dumps(report), flush=True)
    image = Image.new("RGB", (448, 448), (90, 90, 90))
    question = "Is there a lesion in this image? Answer yes or no."
    report["inference"] = timed_inference(models, image, question, args.samples, 32)
    print(json.dumps(report["inference"]), flush=True)
    report["batched_inference"] = batched_inference(models, image, question, 16, 32)
    print(json.dumps(report["batched_inference"]), flush=True)
    s1, s2, s3 = stages["stage1"], stages["stage2"], stages["stage3"]
    report["stage1_step"] = _halving(lambda b: stage1_step(models, image, question, b, 256, s1.lr), s1.batch_size)
    print(json.dumps(report["stage1_step"]), flush=True)
    report["stage2_step"] = _halving(lambda b: stage2_step(
        models, image, question, prompts=b, group=s2.group_size, tokens=s2.max_new_tokens,
        sampling=s2.rollout_sampling, temperature=s2.temperature, top_p=s2.top_p, lora_r=s2.lora_r,
        lora_alpha=s2.lora_alpha, lora_targets=s2.lora_targets, lr=s2.lr, lambda_causal=s2.lambda_causal),
        s2.batch_size)
    print(json.dumps(report["stage2_step"]), flush=True)
    report["stage3_step"] = _halving(lambda b: stage3_step(models, image, question, b, s3.max_new_tokens, s3),
                                     s3.batch_size)
    print(json.dumps(report["stage3_step"]), flush=True)
    models.clear()  # free the VLM before the JSD measurement
    report["jsd"] = jsd_full_vocab(device, args.jsd_positions, 151_936)
    report["total_s"] = time.perf_counter() - t0
    print(json.dumps(report["jsd"]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
