"""Results as JSON (atomic write), a markdown table and a bar plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medsynapse.locking import write_text_atomic


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


def mean_sd_ci(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd and a Student-t interval for the mean over seeds (sd and interval None for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "sd": None, "ci95": None, "n": n, "values": values}
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / n ** 0.5
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n, "values": values}


def aggregate(runs: list[dict]) -> dict:
    """Per-seed result dicts -> the same tree with every number shared by all runs replaced by `mean_sd_ci`."""
    out = {}
    for key in runs[0]:
        values: list[Any] = [run.get(key) for run in runs]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = mean_sd_ci([float(v) for v in values])
        elif all(isinstance(v, dict) for v in values):
            nested = aggregate(values)
            if nested:
                out[key] = nested
    return out


def summarize_seeds(per_seed: dict[int, dict]) -> dict:
    runs = [per_seed[seed] for seed in sorted(per_seed)]
    sections = ("stages", "claims", "diagnostics", "efficiency")
    return {"seeds": sorted(per_seed), **aggregate([{k: run.get(k, {}) for k in sections} for run in runs])}


def _stat(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "—"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_interval(interval: list[float] | None) -> str:
    """A signed interval, '[+0.012, +0.034]' (— when absent)."""
    return "—" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def format_p(value: float | None) -> str:
    """A p-value, '< 0.001' below it (— when absent)."""
    return "—" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"


def summary_report(summary: dict) -> str:
    """Markdown over seeds of the demo's own measurements: claims, efficiency and diagnostics, each as mean ± sd
    [95 % t-interval]; the rows' accuracies and their paired comparisons are the study's table (table.md)."""
    lines = [f"# MedSynapse demo over seeds {', '.join(map(str, summary['seeds']))}",
             "Cells: mean ± sd [95 % t-interval of the mean] over seeds. Every row's accuracy over seeds, with its "
             "paired comparison (hierarchical bootstrap over seeds and questions, seed-level t, Holm): table.md."]
    lines += ["", "## Claims", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_stat(v)} |" for k, v in summary.get("claims", {}).items()]
    if summary.get("efficiency"):
        lines += ["", "## Efficiency", "", "| model | ms / sample | ratio to base |", "|---|---|---|"]
        lines += [f"| {k} | {_stat(v.get('ms_per_sample'), 1)} | {_stat(v.get('ratio_to_base'), 2)} |"
                  for k, v in summary["efficiency"].items()]
    if summary.get("diagnostics"):
        lines += ["", "## Diagnostics", "", diagnostics_tables(summary["diagnostics"])]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, dict) and "mean" in value:
        return _stat(value)
    if isinstance(value, dict) and "accuracy" in value:
        return _cell(value["accuracy"])
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


RELIANCE_KEYS = ("as_is", "zeroed", "mean", "shuffled", "counterfactual", "noise", "collapse_cosine")


def diagnostics_tables(diagnostics: dict) -> str:
    """Leak probe, readability probes and the reliance report as markdown (one seed or aggregated over seeds)."""
    lines = ["Leak probe (linear classifier for the largest lesion's quadrant, trained on train-split memories):", "",
             "| features | accuracy | chance |", "|---|---|---|"]
    for name in ("leak_probe", "leak_probe_zero"):
        probe = diagnostics.get(name) or {}
        label = "demo intervention" if name == "leak_probe" else "paper's zero intervention"
        for key in ("memory", "counterfactual"):
            if probe.get(key) is not None:
                lines.append(f"| {key} ({label}) | {_cell(probe[key])} | {_cell(probe.get('chance'))} |")
    lines += ["", "Readability of lesion presence (linear probe):", "", "| features | accuracy |", "|---|---|"]
    for key, value in (diagnostics.get("readability") or {}).items():
        lines.append(f"| {key} | {_cell(value)} |")
    lines += ["", "Memory reliance (accuracy with the memory replaced; collapse = mean cross-image cosine):", "",
              "| stage | " + " | ".join(RELIANCE_KEYS) + " |", "|---" * (len(RELIANCE_KEYS) + 1) + "|"]
    for stage, row in (diagnostics.get("reliance") or {}).items():
        lines.append(f"| {stage} | " + " | ".join(_cell(row.get(k)) for k in RELIANCE_KEYS) + " |")
    return "\n".join(lines)
