"""Check that `medsynapse pipeline` as a study changed no number: the output of the earlier pipeline (steps/chain.py,
up to commit 8e3e0fe: OUTPUT/stage1..., OUTPUT/eval/ROW/BENCH/) against the study's (OUTPUT/stage1... linked to
OUTPUT/units/, answers under OUTPUT/evals/), both from the same run file with another `output`.

Compares every weight file of Stages I-III tensor for tensor, and for each row (base, stage2, student) and benchmark
every answer (the harness's prediction lines without their timing) and the accuracy. Prints one line; exits 1 if
anything differs.

    git worktree add /tmp/old 8e3e0fe
    PYTHONPATH=/tmp/old/src medsynapse pipeline --config old.yaml     # output: runs/old
    medsynapse pipeline --config new.yaml                             # the same file, output: runs/new
    python scripts/compare_pipeline.py runs/old runs/new synthmed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def predictions(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "ms"} for line in path.read_text().splitlines()]


def differences(old: Path, new: Path, benchmarks: list[str]) -> tuple[list[str], int, int]:
    found, tensors, answers = [], 0, 0
    for stage in ("stage1", "stage2", "stage3_student"):
        files = sorted(p.relative_to(old / stage) for p in (old / stage).rglob("*.safetensors")
                       if "checkpoints" not in p.parts)
        if not files:
            found.append(f"{old / stage}: no weight files")
        for file in files:
            a, b = load_file(str(old / stage / file)), load_file(str((new / stage).resolve() / file))
            tensors += len(a)
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                found.append(f"{stage}/{file}")
    for row in ("base", "stage2", "student"):
        cell = json.loads((new / "cells" / row / "seed_0.json").read_text())
        for bench in benchmarks:
            before = predictions(old / "eval" / row / bench / "predictions.jsonl")
            after = predictions(new / "evals" / cell["evaluation"] / cell["harness"] / bench / "predictions.jsonl")
            answers += len(before)
            if before != after:
                found.append(f"{row}/{bench}: answers")
            metrics = json.loads((old / "eval" / row / bench / "metrics.json").read_text())
            accuracy = cell["benchmarks"][bench]["accuracy"]
            if metrics["accuracy"] != accuracy:
                found.append(f"{row}/{bench}: accuracy {metrics['accuracy']} -> {accuracy}")
    return found, tensors, answers


def main() -> int:
    old, new, benchmarks = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    found, tensors, answers = differences(old, new, benchmarks)
    print(f"{tensors} tensors, {answers} answers compared: " + ("no difference" if not found else
                                                                 "DIFFER: " + "; ".join(found)))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
