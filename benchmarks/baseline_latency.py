"""What each model costs per question when it answers as it was trained: side by side in one run, batch 1.

The efficiency claim of latent reasoning is against explicit chain-of-thought: a CoT model writes its steps before
the answer, a memory model answers at once. `compare_latency` (the demo's timing) forces every model to emit the
same number of tokens, which isolates the per-token overhead of memory but hides the length difference. Here every
model gets its own answer format (recorded in its folder: CoT-SFT replies in `reasoning` format), generates greedily
until its end-of-turn token (or `--budget` tokens), and we report the median ms per question, the mean number of
generated tokens, and the accuracy on the timed questions, model order rotated per question so machine drift hits
all alike; then each model's peak memory in a fresh process (the demo's `measure_isolated`).
Usage: python benchmarks/baseline_latency.py --data DATA/test.jsonl --models base=DIR student=DIR cot_sft=DIR ...
       [--n-timed 60] [--budget 64] [--out baseline_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from medsynapse.answers import format_prompt, is_correct
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.eval.efficiency import measure_isolated
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.vlm import completion_mask, vision_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a SynthMed split (its lesion questions are timed)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--n-timed", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=int, default=64, help="most new tokens per answer")
    parser.add_argument("--out", default="baseline_latency.json")
    args = parser.parse_args()
    samples = [s for s in read_samples(args.data) if s.family == "lesion" and s.answer_type != "caption"]
    samples = samples[:args.warmup + args.n_timed]
    models = {}
    for item in args.models:
        name, _, folder = item.partition("=")
        models[name] = MedSynapseV.from_pretrained(folder, merge_adapter=True).eval()
    names = list(models)
    times = {name: [] for name in names}
    lengths = {name: [] for name in names}
    correct = {name: [] for name in names}
    for index, sample in enumerate(samples):
        image = load_image(sample.images[0], sample)
        for name in names[index % len(names):] + names[:index % len(names)]:
            model = models[name]
            question = format_prompt(sample.model_prompt, model.answer_format)
            item = model.prompts.encode([image], question)
            start = time.perf_counter()
            with torch.no_grad():  # the steps of MedSynapseV.answer_encoded, keeping the tokens to count them
                batch = model.prompts.collate([item], with_answers=False)
                features = vision_features(model.vlm, batch)
                memory = model.memory_for(batch, [image], features)
                tokens = model.generate(batch, memory, max_new_tokens=args.budget, features=features)
            elapsed = (time.perf_counter() - start) * 1000
            if index < args.warmup:
                continue
            mask = completion_mask(tokens, model.prompts.eos_id)
            text = model.prompts.tokenizer.decode(tokens[0][mask[0].bool()], skip_special_tokens=True)
            times[name].append(elapsed)
            lengths[name].append(int(mask.sum()))
            correct[name].append(is_correct(text, sample.answer, sample.answer_type, sample.options,
                                            model.answer_format)[0])
    # peak memory per model in a fresh process (clean CPU peak RSS), the demo's measurement: same questions, the
    # demo's fixed 8 tokens (memory does not depend on the answer's length at this size)
    ids = [s.id for s in samples]
    peaks = {name: measure_isolated(folder, args.data, ids, n_timed=min(10, args.n_timed))["peak_mem_mb"]
             for name, folder in (item.split("=", 1) for item in args.models)}
    base = statistics.median(times[names[0]])
    result = {name: {"ms_per_sample": statistics.median(times[name]),
                     "ratio_to_first": statistics.median(times[name]) / base,
                     "generated_tokens_mean": sum(lengths[name]) / len(lengths[name]),
                     "accuracy_on_timed": sum(correct[name]) / len(correct[name]),
                     "answer_format": models[name].answer_format, "peak_mem_mb": peaks[name],
                     "n_timed": len(times[name])} for name in names}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"| model | format | ms / question | ratio to {names[0]} | tokens generated | peak MB | accuracy (timed) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result.items():
        print(f"| {name} | {row['answer_format']} | {row['ms_per_sample']:.1f} | {row['ratio_to_first']:.2f} | "
              f"{row['generated_tokens_mean']:.1f} | {row['peak_mem_mb']:.0f} | {row['accuracy_on_timed']:.3f} |")


if __name__ == "__main__":
    main()
