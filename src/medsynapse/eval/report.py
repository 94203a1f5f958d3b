"""Results as JSON (atomic write), a markdown table and a bar plot."""

from __future__ import annotations

import json
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: str | Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def stage_table(results: dict) -> str:
    lines = ["| stage | accuracy | n | counterfactual accuracy |", "|---|---|---|---|"]
    for name, row in results["stages"].items():
        cf = row.get("counterfactual_accuracy")
        cf_text = f"{cf:.3f}" if cf is not None else "—"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['n']} | {cf_text} |")
    return "\n".join(lines)


def type_table(results: dict) -> str:
    stages = [s for s in results["stages"] if "by_question_type" in results["stages"][s]]
    types = sorted({t for s in stages for t in results["stages"][s]["by_question_type"]})
    lines = ["| question type | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for t in types:
        cells = [f"{results['stages'][s]['by_question_type'].get(t, {}).get('accuracy', float('nan')):.3f}"
                 for s in stages]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["stages"])
    acc = [results["stages"][n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    bars = ax.bar(names, acc, color="#4C72B0", label="accuracy")
    cf = [(i, results["stages"][n]["counterfactual_accuracy"]) for i, n in enumerate(names)
          if results["stages"][n].get("counterfactual_accuracy") is not None]
    if cf:
        ax.scatter([i for i, _ in cf], [v for _, v in cf], color="#C44E52", zorder=3, marker="v",
                   label="counterfactual memory")
    for bar, value in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("held-out SynthMed lesion questions", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def efficiency_table(results: dict) -> str:
    rows = results.get("efficiency", {})
    base = rows.get("base", {}).get("ms_per_sample")
    lines = ["| model | ms / sample | ratio to base | peak memory MB |", "|---|---|---|---|"]
    for name, row in rows.items():
        ratio = f"{row['ms_per_sample'] / base:.2f}" if base else "—"
        lines.append(f"| {name} | {row['ms_per_sample']:.1f} | {ratio} | {row['peak_mem_mb']:.0f} |")
    return "\n".join(lines)
