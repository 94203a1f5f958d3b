"""Per-GPU memory of the weights and optimizer state for each stage, DDP vs FSDP2 on 2, 4 and 8 GPUs, computed from
the parameter counts of a run file's real-size model (built on the meta device: no weights, no GPU).

Per rank, in GiB (bf16 frozen weights, fp32 trainable weights + gradients + Adam moments = 16 bytes per parameter):
- DDP: the whole VLM (+ the frozen LoRA in Stage III and inference) and the prior encoder, the trainable module with
  its gradients and Adam state;
- FSDP2 (`distributed: fsdp`, recipes/sharding.py): the VLM (with its LoRA) / N, plus the largest two units gathered
  at once (the one running and the one prefetched: with Qwen3-VL-8B the input embeddings and lm_head, 622 M
  parameters each); Stage II's LoRA and its Adam state / N; P_phi and A_psi stay replicated (DDP); the prior encoder
  is replicated (frozen; the feature cache keeps it out of the training steps' compute, not out of memory).
Activations and the rollouts' KV cache come on top, per rank, and scale with the per-rank batch (the global batch / N):
`python benchmarks/gpu_realsize.py` measures them at the run file's settings on a GPU.
Usage: python benchmarks/fsdp_memory.py [--config configs/medsynapse-v-8b.yaml] [--gpus 2 4 8] [--json]
"""

from __future__ import annotations

import argparse
import json

GIB = 2**30


def unit_sizes(vlm) -> list[int]:
    """Parameter counts of the FSDP2 units recipes/sharding.py makes."""
    from medsynapse.recipes.sharding import units

    return [sum(p.numel() for p in unit.parameters()) for unit in units(vlm)]


def table(counts: dict, units: list[int], gpus: list[int]) -> dict:
    p = counts["parameters"]
    frozen_bytes, trainable_bytes = 2, 16
    gathered = sum(sorted(units)[-2:]) * frozen_bytes
    rows = {}
    for stage, lora_trainable, lora_frozen, trainable in (("stage1", False, False, p["sampler"]),
                                                          ("stage2", True, False, p["lora"]),
                                                          ("stage3", False, True, p["autonomous"])):
        vlm = p["vlm"] + (p["lora"] if lora_frozen else 0)
        extra_frozen = p["encoder"] + (p["sampler"] if stage != "stage1" else 0)
        ddp = (vlm + extra_frozen) * frozen_bytes + trainable * trainable_bytes
        row = {"ddp": ddp / GIB}
        for n in gpus:
            sharded_vlm = vlm * frozen_bytes / n + gathered
            state = trainable * trainable_bytes / n if lora_trainable else trainable * trainable_bytes
            row[f"fsdp{n}"] = (sharded_vlm + extra_frozen * frozen_bytes + state) / GIB
        rows[stage] = row
    return {"rows": rows, "gathered_units_gib": gathered / GIB, "largest_unit_parameters": max(units)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/medsynapse-v-8b.yaml")
    parser.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from medsynapse.inspection import build_meta_vlm, from_run, report
    from medsynapse.runconfig import read_run_config

    config = from_run(read_run_config(args.config))
    result = table(report(config), unit_sizes(build_meta_vlm(config)), args.gpus)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    header = "| stage | DDP | " + " | ".join(f"FSDP2 × {n}" for n in args.gpus) + " |"
    lines = [header, "|---" * (len(args.gpus) + 2) + "|"]
    for stage, row in result["rows"].items():
        cells = [f"{row['ddp']:.1f}"] + [f"{row[f'fsdp{n}']:.1f}" for n in args.gpus]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"(GiB per GPU, weights + optimizer state; two gathered units: {result['gathered_units_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
