"""Our plain GRPO step (memory off, λ_causal = 0) vs TRL's GRPOTrainer on the same tiny Qwen3-VL, side by side.

Same base model, LoRA (r, alpha, targets), G, prompts per step, max completion tokens, sampling settings, learning
rate, accuracy reward (our shared extraction) and loss ("grpo", β = 0, μ = 1). The two runs alternate, A B A B, in
one process; medians of per-step wall times after warm-up are compared.
Usage: python benchmarks/grpo_vs_trl.py --vlm VLM_DIR --train-file DATA/train.jsonl [--steps 12 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

LORA = dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def ours(args) -> list[float]:
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

    out = Path(tempfile.mkdtemp())
    train_stage2(Stage2Config(model=args.vlm, use_memory=False, lambda_causal=0.0, train_file=args.train_file,
                              output_dir=str(out), lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                              lora_targets=LORA["targets"], group_size=args.group, batch_size=args.prompts,
                              max_steps=args.steps, lr=3e-4, temperature=1.0, top_p=1.0,
                              max_new_tokens=args.max_tokens, families=["lesion"],
                              answer_types=["yes_no", "multiple_choice"], save_every=10_000, log_every=10_000))
    return json.loads((out / "causal_reward_summary.json").read_text())["step_seconds_this_run"]


def trl(args) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from medsynapse.answers import is_correct
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.model.medsynapse import lora_target_regex
    from medsynapse.model.vlm import load_vlm

    samples = [s for s in read_samples(args.train_file) if s.family == "lesion"
               and s.answer_type in ("yes_no", "multiple_choice")]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
             "image": load_image(s.images[0], s), "answer": s.answer, "answer_type": s.answer_type,
             "options": json.dumps(s.options)} for s in samples[: args.prompts * (args.steps + 2)]]

    def accuracy(completions, answer, answer_type, options, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(is_correct(t, a, k, json.loads(o))[0]) for t, a, k, o in zip(texts, answer, answer_type, options)]

    model, processor = load_vlm(args.vlm, dtype="float32")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.max_tokens, temperature=1.0,
                        top_p=1.0, learning_rate=3e-4, max_steps=args.steps, beta=0.0, loss_type="grpo",
                        num_iterations=1, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, dataloader_num_workers=0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[StepTimer()],
                          peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=lora_target_regex(LORA["targets"])))
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vlm", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=6)
    args = parser.parse_args()

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    results: dict[str, list[float]] = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        results["ours"] += ours(args)[2:]  # the first steps warm up caches
        results["trl"] += trl(args)[2:]
    a, b = statistics.median(results["ours"]), statistics.median(results["trl"])
    print(f"{args.prompts} prompts x G={args.group}, max {args.max_tokens} new tokens, LoRA r={LORA['r']}, "
          f"{len(results['ours'])} timed steps each")
    print("| trainer | median step s |\n|---|---|")
    print(f"| MedSynapse Stage II loop (memory off, λ_causal=0) | {a:.3f} |\n| TRL GRPOTrainer | {b:.3f} |")
    print(f"ratio ours / TRL: {a / b:.2f}")


if __name__ == "__main__":
    main()
