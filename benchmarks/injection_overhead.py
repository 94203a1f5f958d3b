"""Cost of memory injection on the tiny Qwen3-VL, measured side by side in one run.

Compares, on the same batch: the plain `input_ids` forward, the spliced-memory forward (pixels passed), and the
spliced forward reusing cached vision features. Prints medians and ratios to the plain forward.
Usage: python benchmarks/injection_overhead.py [--batch 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.data.synthmed import corpus_lines, generate_split
    from medsynapse.model.tiny import build_tiny_vlm
    from medsynapse.model.vlm import PromptBuilder, forward_with_memory, load_vlm, vision_features

    root = Path(tempfile.mkdtemp())
    build_tiny_vlm(root / "vlm", corpus_lines())
    samples = read_samples(generate_split(root / "data", "test", args.batch, seed=0))[: args.batch]
    model, processor = load_vlm(root / "vlm")
    model.eval()
    prompts = PromptBuilder(processor, n_memory=16)
    batch = prompts.collate([prompts.encode([load_image(s.images[0], s)], s.question) for s in samples])
    memory = torch.randn(len(samples), 16, model.config.text_config.hidden_size) * 0.02

    with torch.no_grad():
        def plain():
            model.model.rope_deltas = None
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  mm_token_type_ids=batch.mm_token_type_ids, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)

        features = vision_features(model, batch)
        rows = {
            "plain input_ids forward": median_ms(plain, args.repeats),
            "spliced memory, pixels": median_ms(
                lambda: forward_with_memory(model, batch, memory, prompts.latent_id), args.repeats),
            "spliced memory, cached vision features": median_ms(
                lambda: forward_with_memory(model, batch, memory, prompts.latent_id, features=features),
                args.repeats),
        }
    base = rows["plain input_ids forward"]
    print(f"batch {len(samples)}, sequence {batch.input_ids.shape[1]} tokens, {torch.get_num_threads()} threads")
    print("| forward | median ms | ratio to plain |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
