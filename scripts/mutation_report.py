"""Mutation score per module from mutmut's results (`make mutation` runs it after `mutmut run`).

Reads `mutmut results --all true` ("<module>.x_<function>__mutmut_<k>: <status>"), groups by module and prints a
markdown table: killed (a test failed, or the mutant timed out: mutmut's convention; timeouts are also shown apart),
survived, no tests (no selected test reaches the
function), not checked (not run yet, e.g. a sampled run), and the score killed / checked, counting "no tests" as
survivors. Writes the same numbers to mutants/mutation_report.json.

With `--sample` it reads `mutants-sample/results.jsonl` (`make mutation-sample`, scripts/mutation_sample.py) instead:
the score per package with its 95 % Wilson interval (the sample is a systematic draw from each package's mutants, so
the interval is the binomial one), the population each sample was drawn from, and every survivor's diff
(`mutants-sample/report.md`, `report.json`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<module>[\w.]+)\.x[ŁǁΔ_]?(?P<function>\w+?)__mutmut_\d+: (?P<status>.+)$")
KILLED = {"killed", "timeout"}


def read_results(mutmut: str) -> dict[str, Counter]:
    text = subprocess.run([mutmut, "results", "--all", "true"], check=True, capture_output=True, text=True).stdout
    per_module: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            per_module[match["module"]][match["status"].strip()] += 1
    if not per_module:
        raise SystemExit("no mutmut results: run `mutmut run` first")
    return per_module


def table(per_module: dict[str, Counter]) -> tuple[str, dict]:
    rows, report = [], {}
    totals: Counter = Counter()
    for module, counts in sorted(per_module.items()):
        totals.update(counts)
        rows.append(_row(module, counts, report))
    rows.append(_row("**all**", totals, report))
    header = ("| module | mutants | checked | killed | of which timeout | survived | no tests | "
              "score (killed / checked) |\n|---|---|---|---|---|---|---|---|\n")
    return header + "\n".join(rows), report


def _row(name: str, counts: Counter, report: dict) -> str:
    total = sum(counts.values())
    checked = total - counts["not checked"]
    killed = sum(counts[s] for s in KILLED)
    score = killed / checked if checked else 0.0
    report[name.strip("*")] = {"mutants": total, "checked": checked, "killed": killed,
                               "survived": counts["survived"], "no_tests": counts["no tests"], "score": score,
                               "statuses": dict(counts)}
    return (f"| {name} | {total} | {checked} | {killed} | {counts['timeout']} | {counts['survived']} | "
            f"{counts['no tests']} | {100 * score:.1f} % |")


def sample_report(folder: Path) -> tuple[str, dict]:
    """Per package: sampled, killed (a test failed), survived, no tests, timeout, error and skipped (the three
    undecided: a timeout is a slow test past its limit, not a proven hang; skipped, tests that need `.venv-vllm`), the
    score killed / decided with its Wilson 95 % interval (decided = sampled - timeout - error - skipped; no tests
    counts as survived); then the survivors' diffs."""
    from scipy.stats import binomtest

    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    population = json.loads((folder / "population.json").read_text())
    rows, report = [], {}
    packages = sorted({r["package"] for r in records}) + ["all"]
    for package in packages:
        chosen = [r for r in records if package in ("all", r["package"])]
        counts = Counter(r["status"] for r in chosen)
        killed = counts["killed"]  # a timeout here is a slow test over its limit, not a hang: left undecided
        checked = len(chosen) - counts["error"] - counts["timeout"] - counts["skipped"]
        interval = binomtest(killed, checked).proportion_ci(method="wilson") if checked else None
        total = sum(population.values()) if package == "all" else population.get(package, 0)
        report[package] = {"population": total, "sampled": len(chosen), "killed": killed,
                           "timeout": counts["timeout"], "survived": counts["survived"], "no_tests": counts["no tests"],
                           "error": counts["error"], "skipped": counts["skipped"],
                           "score": killed / checked if checked else None,
                           "interval": [interval.low, interval.high] if interval else None}
        score = f"{100 * killed / checked:.0f} % [{100 * interval.low:.0f}, {100 * interval.high:.0f}]" \
            if checked else "-"
        name = f"**{package}**" if package == "all" else package
        rows.append(f"| {name} | {total:,} | {len(chosen)} | {killed} | {counts['survived']} | {counts['no tests']} | "
                    f"{counts['timeout']} | {counts['error']} | {counts['skipped']} | {score} |")
    header = ("| package | mutants | sampled | killed | survived | no tests | timeout | error | skipped | "
              "score [95 % CI] |\n|---|---|---|---|---|---|---|---|---|---|\n")
    survivors = [r for r in records if r["status"] in ("survived", "no tests")]
    details = "\n".join(f"### {r['key']} ({r['status']}, {r['tests']} tests by {r['selected_by']})\n```diff\n"
                        f"{r['diff']}```" for r in survivors)
    return header + "\n".join(rows) + "\n\n## Survivors\n\n" + details + "\n", report


def main() -> int:
    if "--sample" in sys.argv[1:]:
        folder = Path("mutants-sample")
        markdown, report = sample_report(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=2))
        (folder / "report.md").write_text(markdown)
        print(markdown.split("\n## Survivors")[0])
        return 0
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    markdown, report = table(read_results(mutmut))
    Path("mutants").mkdir(exist_ok=True)
    Path("mutants/mutation_report.json").write_text(json.dumps(report, indent=2))
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
