"""Real-size, random-weight check for GPU users: Qwen3-VL-8B in bf16 with MedSynapse-V's modules.

Measures, on one GPU: (1) ms/sample and peak memory of base vs teacher (SAM 3-sized vision trunk + P_phi) vs
encoder-free student (A_psi) inference, batch 1, a 448 px image, exactly 32 generated tokens; (2) one Stage II step
(B prompts x G rollouts: batched sampled generate, factual + counterfactual scoring in one forward, clipped GRPO
update of a rank-64 attention LoRA); (3) the chunked generalized JSD at the full 151,936-token vocabulary against the
naive formula. Weights are random (no download): speed and memory are representative, answers are not.
Usage: python benchmarks/gpu_realsize.py [--preset qwen3-vl-8b|tiny] [--out results.json]
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


def build(preset: str, device: str, dtype: torch.dtype):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from medsynapse.data.synthmed import corpus_lines
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.memory import (
        AutonomousConfig,
        AutonomousMemoryModule,
        DiagnosticMemorySampler,
        SamplerConfig,
    )
    from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm
    from medsynapse.model.vlm import load_processor
    from medsynapse.recipes.inspect import PRESETS

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
    with torch.device(device):
        sampler = DiagnosticMemorySampler(SamplerConfig(prior_dim=prior_dim, hidden_size=hidden, width=width,
                                                        heads=8 if width >= 512 else 4)).to(dtype).eval()
        autonomous = AutonomousMemoryModule(AutonomousConfig(hidden_size=hidden)).to(dtype).eval()
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
                sampling: str = "keyed") -> dict:
    from peft import LoraConfig, get_peft_model

    from medsynapse.data.schema import Sample
    from medsynapse.model.medsynapse import lora_target_regex
    from medsynapse.model.sampling import row_keys
    from medsynapse.model.vlm import completion_logprobs, select_features, vision_features
    from medsynapse.objectives.grpo import clipped_policy_loss, group_advantages
    from medsynapse.objectives.rewards import accuracy_rewards, causal_rewards
    from medsynapse.recipes.stage2_ccr import Stage2Config, factual_and_counterfactual_logprobs, generate_rollouts

    teacher = models["teacher"]
    lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=lora_target_regex(
        ["q_proj", "k_proj", "v_proj", "o_proj"]))
    teacher.vlm = get_peft_model(teacher.vlm, lora)
    trainable = [p for p in teacher.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    config = Stage2Config(temperature=1.0, top_p=0.95, max_new_tokens=tokens, rollout_sampling=sampling)
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
        rewards = r_acc + 0.5 * causal_rewards(logp_f, logp_cf, rollouts.mask)
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
    teacher.vlm = teacher.vlm.unload()  # drop the LoRA layers so the next call starts from the plain VLM
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen3-vl-8b", choices=["qwen3-vl-8b", "qwen3-vl-4b", "tiny"])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--jsd-positions", type=int, default=1024)
    parser.add_argument("--out", default="gpu_realsize.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    models = build(args.preset, device, dtype)
    report = {"preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": str(dtype), "build_s": time.perf_counter() - t0}
    print(json.dumps(report), flush=True)
    image = Image.new("RGB", (448, 448), (90, 90, 90))
    question = "Is there a lesion in this image? Answer yes or no."
    report["inference"] = timed_inference(models, image, question, args.samples, 32)
    print(json.dumps(report["inference"]), flush=True)
    report["batched_inference"] = batched_inference(models, image, question, 16, 32)
    print(json.dumps(report["batched_inference"]), flush=True)
    report["stage2_step"] = stage2_step(models, image, question, prompts=4, group=4, tokens=64)
    print(json.dumps(report["stage2_step"]), flush=True)
    report["stage2_step_torch_sampling"] = stage2_step(models, image, question, 4, 4, 64, sampling="torch")
    print(json.dumps(report["stage2_step_torch_sampling"]), flush=True)
    del models
    report["jsd"] = jsd_full_vocab(device, args.jsd_positions, 151_936)
    report["total_s"] = time.perf_counter() - t0
    print(json.dumps(report["jsd"]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
