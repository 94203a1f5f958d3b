"""Our batched, KV-cached latent loop against the public codes' way (one sample at a time, a full forward per thought),
side by side in one run on the same prompts: same thoughts, and the time ratio.

Both compute k thoughts for B prompts of the tiny Qwen3-VL (SynthMed scans at 128 px: 16 merged visual tokens,
~60-token prompts). Ours: one batched prompt pass into a KV cache, then one single-position pass per thought.
Reference (Coconut / IVT-LR public code): per sample, k forwards over the whole prompt (`latent_thoughts_uncached` on
a batch of one). The thoughts are compared (max abs difference) before the times are reported.
Usage: python benchmarks/latent_loop.py [--batch 16] [--thoughts 6] [--repeats 5] [--out latent_loop.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from medsynapse.data.images import load_image
    from medsynapse.data.schema import read_samples
    from medsynapse.data.synthmed import corpus_lines, generate_split
    from medsynapse.model.latent import latent_thoughts, latent_thoughts_uncached
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.tiny import TinyVLMSpec, build_tiny_vlm
    from medsynapse.model.vlm import PromptBuilder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--thoughts", type=int, default=6, help="k (Coconut's GSM8k setting: 3 stages x c 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="latent_loop.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    folder = build_tiny_vlm(root / "vlm", corpus_lines(), TinyVLMSpec(vlm_resolution=128))
    data = generate_split(root / "data", "test", max(4, args.batch // 4 + 1), seed=0)
    model = MedSynapseV.from_pretrained(str(folder), dtype="float32").eval()
    prompts = PromptBuilder(model.processor, args.thoughts)
    samples = read_samples(data)[:args.batch]
    items = [prompts.encode([load_image(s.images[0], s)], s.question) for s in samples]
    batch = prompts.collate(items, with_answers=False)
    singles = [prompts.collate([item], with_answers=False) for item in items]

    def ours():
        return latent_thoughts(model.vlm, batch, args.thoughts, prompts.latent_id)

    def reference():
        return torch.cat([latent_thoughts_uncached(model.vlm, one, args.thoughts, prompts.latent_id)
                          for one in singles])

    with torch.no_grad():
        difference = float((ours() - reference()).abs().max())
        times = {"ours": [], "reference": []}
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            for name, fn in (("ours", ours), ("reference", reference)):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    result = {"batch": args.batch, "thoughts": args.thoughts, "threads": torch.get_num_threads(),
              "max_abs_difference": difference,
              **{f"{name}_ms": statistics.median(values) for name, values in times.items()}}
    result["speedup"] = result["reference_ms"] / result["ours_ms"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
