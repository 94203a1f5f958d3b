"""The evaluation summary laid out like the paper's Table 1: one row per model, one column per benchmark, Avg, and
the efficiency columns; written as markdown, CSV and a bar plot, from the metrics.json files of one or more runs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

from medsynapse.data.sources import PAPER_BENCHMARKS, SOURCES
from medsynapse.locking import write_text_atomic


def read_run(run_dir: str | Path) -> dict[str, dict]:
    """metrics.json of every benchmark folder under a run directory, by benchmark name."""
    run_dir = Path(run_dir)
    found = {}
    for path in sorted(run_dir.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        found[metrics["benchmark"]] = metrics
    return found


def _columns(runs: dict[str, dict[str, dict]]) -> list[str]:
    present = {name for metrics in runs.values() for name in metrics}
    ordered = [b for b in PAPER_BENCHMARKS if b in present]
    return ordered + sorted(present - set(ordered))


def summary_rows(runs: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    columns = _columns(runs)
    header = ["model"] + [SOURCES[c].label if c in SOURCES else c for c in columns] + [
        "Avg", "ms_per_sample", "peak_mem_mb"]
    rows = []
    for label, metrics in runs.items():
        cells, scores, ms, n_ms, peak = [label], [], 0.0, 0, None
        for column in columns:
            m = metrics.get(column)
            accuracy = m.get("accuracy") if m else None
            cells.append("—" if accuracy is None else f"{100 * accuracy:.1f}")
            if accuracy is not None and column in PAPER_BENCHMARKS:
                scores.append(accuracy)
            eff = (m or {}).get("efficiency", {})
            if eff.get("ms_per_sample") is not None:
                assert m is not None  # eff is empty without m
                ms += eff["ms_per_sample"] * m["n"]
                n_ms += m["n"]
            if eff.get("peak_mem_mb") is not None:
                peak = max(peak or 0.0, eff["peak_mem_mb"])
        cells.append(f"{100 * sum(scores) / len(scores):.1f}" if scores else "—")
        cells.append(f"{ms / n_ms:.1f}" if n_ms else "—")
        cells.append(f"{peak:.0f}" if peak is not None else "—")
        rows.append(cells)
    return header, rows


def markdown(runs: dict[str, dict[str, dict]]) -> str:
    header, rows = summary_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Accuracy in %. Avg: mean over the paper's seven benchmarks present. ms_per_sample: generation time "
              "per question, weighted by n; peak_mem_mb: the largest per-benchmark peak (GPU allocated, or CPU RSS "
              "above the level before the benchmark).", "", "| benchmark | n | unparseable | skipped | scored subset |",
              "|---|---|---|---|---|"]
    for name in _columns(runs):
        m = next(metrics[name] for metrics in runs.values() if name in metrics)
        lines.append(f"| {name} | {m['n']} | {m['unparseable']} | {m['n_skipped']} | {m['closed_definition']} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(runs)
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 3.4))
    width = 0.8 / max(len(runs), 1)
    for k, (label, metrics) in enumerate(runs.items()):
        values = [100 * metrics[c]["accuracy"] if metrics.get(c, {}).get("accuracy") is not None else float("nan")
                  for c in columns]  # missing or unscorable: no bar, not a zero
        ax.bar([i + k * width for i in range(len(columns))], values, width, label=label)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(columns))])
    ax.set_xticklabels([SOURCES[c].label if c in SOURCES else c for c in columns], rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(output: str | Path, label: str | None = None, runs: Mapping[str, str | Path] | None = None) -> str:
    """Summary of the run in `output` (labelled `label`), or of several runs {label: dir}, written into `output`."""
    output = Path(output)
    loaded = {name: read_run(d) for name, d in (runs or {label or output.name: output}).items()}
    text = markdown(loaded)
    write_text_atomic(output / "summary.md", text)
    header, rows = summary_rows(loaded)
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([header, *rows])
    write_text_atomic(output / "summary.csv", table.getvalue())
    plot(loaded, output / "summary.png")
    return text
