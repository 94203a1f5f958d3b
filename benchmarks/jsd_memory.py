"""Peak memory and time of our chunked generalized JSD vs TRL's generalized_jsd_loss at Qwen3-VL's vocabulary.

Each variant runs in its own subprocess (clean peak): inputs are built first (student and teacher logits, fp32,
positions x 151,936), then one forward + backward; "extra" is the peak RSS above the level after the inputs existed
(sampled every 2 ms). Values and gradients are compared across variants.
Usage: python benchmarks/jsd_memory.py [--positions 1024] [--vocab 151936] [--beta 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run_variant(name: str, positions: int, vocab: int, beta: float) -> dict:
    import torch

    from medsynapse.eval.efficiency import PeakRSS, rss_mb

    torch.manual_seed(0)
    student = torch.randn(1, positions, vocab).mul_(2).requires_grad_(True)
    teacher = torch.randn(1, positions, vocab).mul_(2)
    mask = torch.ones(1, positions, dtype=torch.bool)
    mask[0, : positions // 8] = False  # some masked positions, as a padded batch has
    before = rss_mb()
    with PeakRSS() as rss:
        start = time.perf_counter()
        if name == "ours":
            from medsynapse.objectives.jsd import generalized_jsd

            loss = generalized_jsd(student, teacher, mask, beta=beta, chunk_size=32)
        else:
            from trl.experimental.gkd import GKDTrainer

            labels = torch.where(mask, 0, -100)
            loss = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
        forward = time.perf_counter() - start
        loss.backward()
        total = time.perf_counter() - start
    grad = student.grad
    return {"variant": name, "loss": float(loss), "forward_s": forward, "backward_s": total - forward,
            "peak_extra_mb": rss.peak - before, "grad_sum": float(grad.double().sum()),
            "grad_abs_sum": float(grad.double().abs().sum()), "grad_0": grad[0, -1, :5].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--variant", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.positions, args.vocab, args.beta)))
        return
    rows = []
    for variant in ("ours", "trl"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions", str(args.positions),
                              "--vocab", str(args.vocab), "--beta", str(args.beta)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, trl = rows
    tensor_mb = args.positions * args.vocab * 4 / 2**20
    print(f"{args.positions} positions x vocabulary {args.vocab}, beta {args.beta}, fp32; one logits tensor = "
          f"{tensor_mb:.0f} MB")
    print("| variant | loss | forward s | backward s | peak extra MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['loss']:.6f} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
              f"{r['peak_extra_mb']:.0f} |")
    rel = abs(ours["grad_abs_sum"] - trl["grad_abs_sum"]) / trl["grad_abs_sum"]
    print(f"|Δloss| = {abs(ours['loss'] - trl['loss']):.2e}; relative Δ of Σ|grad| = {rel:.2e}")
    print(f"peak extra memory ratio ours / TRL = {ours['peak_extra_mb'] / trl['peak_extra_mb']:.3f}; "
          f"time ratio = {(ours['forward_s'] + ours['backward_s']) / (trl['forward_s'] + trl['backward_s']):.3f}")


if __name__ == "__main__":
    main()
