"""Check that a refactor of the demo changed no number: two demo output folders of the same settings compared.

Compares every row's accuracy, n, unparseable answers, accuracy per question type, accuracy with M' and causal
reward; the diagnostics, the encoder's metrics, the claims (without latency) and Stage II's causal-reward record; the
weight files of Stages I-III and both controls byte for byte (through each row's name: a folder, or the link to its
unit); and every answer (raw text and correctness per question id). Prints one line per row and every difference;
exits 1 if there is any.

    python scripts/compare_demo.py runs/demo-before runs/demo-after
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROW_KEYS = ("accuracy", "n", "unparseable", "by_question_type", "counterfactual_accuracy",
            "counterfactual_sensitivity", "mean_causal_reward_correct", "mean_causal_reward_wrong")
WEIGHTS = ("stage1/sampler.safetensors", "stage2/adapter/adapter_model.safetensors",
           "stage3_student/autonomous.safetensors", "sft/adapter/adapter_model.safetensors",
           "grpo_only/adapter/adapter_model.safetensors")


def answers(path: Path) -> dict[str, tuple[str, bool]]:
    return {line["id"]: (line["raw"], line["correct"]) for line in map(json.loads, path.read_text().splitlines())}


def differences(a: Path, b: Path) -> list[str]:
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (a, b))
    found = []
    for row, mine in first["stages"].items():
        theirs = second["stages"].get(row)
        if theirs is None:
            found.append(f"row {row}: missing in {b}")
            continue
        found += [f"{row}.{key}: {mine.get(key)} vs {theirs.get(key)}" for key in ROW_KEYS
                  if mine.get(key) != theirs.get(key)]
        print(f"{row:16s} {mine['accuracy']:.4f} {theirs['accuracy']:.4f}")
    found += [key for key in ("diagnostics", "encoder", "splits") if first[key] != second[key]]
    for key, drop in (("claims", "latency"), ("stage2_causal_reward", "seconds")):
        if ({k: v for k, v in first[key].items() if drop not in k}
                != {k: v for k, v in second[key].items() if drop not in k}):
            found.append(key)
    found += [w for w in WEIGHTS if (a / w).read_bytes() != (b / w).read_bytes()]
    for path in sorted(a.glob("predictions_*.jsonl")):
        if "counterfactual" not in path.name and answers(path) != answers(b / path.name):
            found.append(path.name)
    return found


def main() -> int:
    found = differences(Path(sys.argv[1]), Path(sys.argv[2]))
    print("no difference" if not found else "differences:\n  " + "\n  ".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
