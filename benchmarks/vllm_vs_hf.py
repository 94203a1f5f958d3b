"""vLLM vs transformers generation for one MedSynapse-V model, side by side in one run (needs `.venv-vllm`).

Two workloads, each timed end to end (memory computed by MedSynapseV on both sides, then generation):
  - eval: `--questions` greedy answers of `--max-new-tokens` tokens. transformers: `MedSynapseV.generate_encoded` in
    batches of `--batch` (the eval harness's path); vLLM: `VLLMEngine.generate`, all questions in one call (vLLM
    batches itself). Reported as questions per second; the greedy tokens of the two are compared (equal count);
  - rollouts (`--rollout-prompts` > 0): Stage II's generation at the demo's settings, G = `--group` sampled
    continuations per prompt at temperature 1.0, top-p 1, `--rollout-tokens` tokens. transformers: one sampled
    `generate` over the prompts repeated G times (as `generate_rollouts`), vision features and memory computed once
    per prompt; vLLM: `n=G` per prompt. Reported as rollouts per second.
  - training (`--train-steps` > 0): whole Stage II steps at the demo's settings (its LoRA on every projection,
    centred reward, `--rollout-prompts` prompts × G), `engine: hf` against `engine: vllm` (the LoRA's merged weights
    loaded into vLLM before every step); the median step time after the first, and vLLM's log-prob gap to the
    training model (≤ 1e-4 when the engine samples the policy being trained).
Each is run once to warm up, then `--repeats` times; the median wall time is reported, with the ratio vLLM/hf of the
rates. vLLM's start-up is timed apart. Default model: a random-weight tiny Qwen3-VL teacher built here (the demo's
sizes: 16 memory slots, sampler width 128, a LoRA merged); `--model DIR` benchmarks one of our folders instead.
The engine runs in its own process (vLLM's default, so the `__main__` guard below); this process keeps torch's
threads for transformers. On a shared machine the numbers move with its load: compare within one run.

Usage: .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--model DIR] [--questions 64] [--out vllm_vs_hf.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def build_tiny_teacher(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen3-VL at the demo's sizes (64-px scans at 128 px: 16 visual tokens) + prior encoder + P_phi (16
    slots, width 128), a non-zero LoRA merged; returns (folder, data)."""
    from medsynapse.data.synthmed import corpus_lines, generate_split
    from medsynapse.model.encoders import TinySegEncoder
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm

    vlm = build_tiny_vlm(root / "vlm", corpus_lines(), TinyVLMSpec(image_size=64, vlm_resolution=128))
    torch.manual_seed(0)
    TinySegEncoder().eval().save_pretrained(root / "encoder")
    data = generate_split(root / "data", "test", 16, seed=0)
    model = MedSynapseV.build(str(vlm), str(root / "encoder"), n_memory=16, width=128, dtype="float32")
    model.add_lora(16, 32, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(root / "teacher")
    model.vlm = model.vlm.unload()  # the same VLM without its LoRA: a Stage I folder for the training workload
    model.save_pretrained(root / "stage1")
    return root / "teacher", data


def load_questions(data: Path, count: int) -> tuple[list, list[str]]:
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples

    samples = read_samples(data)
    samples = [samples[i % len(samples)] for i in range(count)]
    return [load_image(s.images[0], s) for s in samples], [s.question for s in samples]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def hf_eval(model, images: list, questions: list[str], max_new: int, batch: int) -> list[list[int]]:
    """Greedy tokens per question through `generate_encoded`, cut after the first end token."""
    from medsynapse.model.vlm import completion_mask

    out = []
    for start in range(0, len(questions), batch):
        imgs, qs = images[start:start + batch], questions[start:start + batch]
        items = [model.prompts.encode([img], q) for img, q in zip(imgs, qs)]
        tokens = model.generate_encoded(items, imgs, max_new)
        mask = completion_mask(tokens, model.prompts.eos_id)
        out += [row[:int(m.sum())].tolist() for row, m in zip(tokens, mask)]
    return out


@torch.no_grad()
def hf_rollouts(model, images: list, questions: list[str], group: int, max_new: int) -> int:
    """Stage II's rollout generation (`generate_rollouts`): prompts repeated G times, one sampled `generate`."""
    from medsynapse.model.vlm import select_features, vision_features

    items = [model.prompts.encode([img], q) for img, q in zip(images, questions)]
    prompts = model.prompts.collate(items, with_answers=False)
    features = vision_features(model.vlm, prompts)
    memory = model.memory_for(prompts, images, features)
    rows = [r for r in range(len(items)) for _ in range(group)]
    batch = prompts.select(rows)
    tokens = model.generate(batch, None if memory is None else memory[rows], max_new_tokens=max_new,
                            features=select_features(features, prompts.image_rows(rows)), do_sample=True,
                            temperature=1.0, top_p=1.0)
    return tokens.shape[0]


def vllm_eval(engine, images: list, questions: list[str], max_new: int) -> list[list[int]]:
    return [out[0].token_ids for out in engine.generate([[img] for img in images], questions, max_new)]


def vllm_rollouts(engine, images: list, questions: list[str], group: int, max_new: int) -> int:
    outputs = engine.generate([[img] for img in images], questions, max_new, n=group, temperature=1.0, seed=0)
    return sum(len(out) for out in outputs)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stage2_steps(stage1: Path, data: Path, engine: str, steps: int, prompts: int, group: int, tokens: int,
                 work: Path) -> dict:
    """`steps` Stage II steps at the demo's settings with one engine: each step's seconds and the log-prob gaps."""
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

    out = train_stage2(Stage2Config(model=str(stage1), train_file=str(data), output_dir=str(work / f"stage2-{engine}"),
                                    lora_r=16, lora_alpha=32, lora_targets=ALL_PROJECTIONS, group_size=group,
                                    batch_size=prompts, max_steps=steps, save_every=steps, lr=3e-4,
                                    max_new_tokens=tokens, temperature=1.0, top_p=1.0, causal_form="centred",
                                    report_to="none", engine=engine))
    summary = json.loads((out / "causal_reward_summary.json").read_text())
    return {"step_s": summary["step_seconds_this_run"], "gaps": summary.get("engine_logprob_gap_per_step"),
            "rollout_s": summary["rollout_seconds_this_run"], "sync_s": summary.get("engine_sync_seconds_per_step")}


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> None:
    from medsynapse.engines.vllm_engine import VLLMEngine
    from medsynapse.model.medsynapse import MedSynapseV

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="one of our model folders (default: a tiny teacher built here)")
    parser.add_argument("--data", help="a SynthMed split for the questions (default: the one built here)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the eval protocol's budget")
    parser.add_argument("--batch", type=int, default=64, help="transformers' eval batch (the demo's)")
    parser.add_argument("--rollout-prompts", type=int, default=16, help="0: skip the rollout workload")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--rollout-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=4, help="Stage II steps per engine; 0: skip")
    parser.add_argument("--out", default="vllm_vs_hf.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm_vs_hf-"))
    folder, data = (Path(args.model), Path(args.data)) if args.model else build_tiny_teacher(work)
    model = MedSynapseV.from_pretrained(folder, merge_adapter=True).eval()
    images, questions = load_questions(data, args.questions)
    start = time.perf_counter()
    engine = VLLMEngine(model, work / "vllm", max_model_len=1024)
    startup = time.perf_counter() - start

    hf_s, hf_tokens = timed(lambda: hf_eval(model, images, questions, args.max_new_tokens, args.batch), args.repeats)
    vl_s, vl_tokens = timed(lambda: vllm_eval(engine, images, questions, args.max_new_tokens), args.repeats)
    result = {"model": str(args.model or "tiny teacher (random weights, demo sizes)"), "n_memory": model.n_memory,
              "threads": torch.get_num_threads(), "vllm_startup_s": startup,
              "eval": {"questions": len(questions), "max_new_tokens": args.max_new_tokens, "hf_batch": args.batch,
                       "hf_s": hf_s, "vllm_s": vl_s, "hf_questions_per_s": rate(len(questions), hf_s),
                       "vllm_questions_per_s": rate(len(questions), vl_s), "ratio_vllm_over_hf": hf_s / vl_s,
                       "greedy_equal": sum(a == b for a, b in zip(hf_tokens, vl_tokens))}}
    if args.rollout_prompts:
        r_images, r_questions = images[:args.rollout_prompts], questions[:args.rollout_prompts]
        hf_r, n_hf = timed(lambda: hf_rollouts(model, r_images, r_questions, args.group, args.rollout_tokens),
                           args.repeats)
        vl_r, n_vl = timed(lambda: vllm_rollouts(engine, r_images, r_questions, args.group, args.rollout_tokens),
                           args.repeats)
        result["rollouts"] = {"prompts": len(r_questions), "group": args.group, "max_new_tokens": args.rollout_tokens,
                              "temperature": 1.0, "hf_s": hf_r, "vllm_s": vl_r,
                              "hf_rollouts_per_s": rate(n_hf, hf_r), "vllm_rollouts_per_s": rate(n_vl, vl_r),
                              "ratio_vllm_over_hf": hf_r / vl_r}
    stage1 = folder.parent / "stage1"
    if args.train_steps and stage1.exists():  # the tiny teacher built here (a --model folder has no Stage I twin)
        del engine  # its process's cores go to the training runs
        runs = {name: stage2_steps(stage1, data, name, args.train_steps + 1, args.rollout_prompts or 16, args.group,
                                   args.rollout_tokens, work) for name in ("hf", "vllm")}
        medians = {name: statistics.median(run["step_s"][1:]) for name, run in runs.items()}
        result["training"] = {"steps_timed": args.train_steps, "prompts": args.rollout_prompts or 16,
                              "group": args.group, "max_new_tokens": args.rollout_tokens,
                              "hf_step_s": medians["hf"], "vllm_step_s": medians["vllm"],
                              "ratio_vllm_over_hf": medians["hf"] / medians["vllm"],
                              "vllm_logprob_gap_max": max(runs["vllm"]["gaps"]), "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    ev = result["eval"]
    print(f"eval: hf {ev['hf_questions_per_s']:.2f} q/s, vLLM {ev['vllm_questions_per_s']:.2f} q/s, "
          f"ratio {ev['ratio_vllm_over_hf']:.2f}x; greedy equal {ev['greedy_equal']}/{ev['questions']}")
    if "rollouts" in result:
        ro = result["rollouts"]
        print(f"rollouts (G={ro['group']}, T=1.0): hf {ro['hf_rollouts_per_s']:.1f}/s, vLLM "
              f"{ro['vllm_rollouts_per_s']:.1f}/s, ratio {ro['ratio_vllm_over_hf']:.2f}x")
    if "training" in result:
        tr = result["training"]
        print(f"Stage II step ({tr['prompts']} prompts x G {tr['group']}): hf {tr['hf_step_s']:.2f} s, vLLM "
              f"{tr['vllm_step_s']:.2f} s, ratio {tr['ratio_vllm_over_hf']:.2f}x; vLLM log-prob gap "
              f"{tr['vllm_logprob_gap_max']:.1e}")
    print(f"vLLM start-up {startup:.1f} s; written {args.out}")


if __name__ == "__main__":
    main()
