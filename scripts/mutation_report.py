"""Mutation score per module from mutmut's results (`make mutation` runs it after `mutmut run`).

Reads `mutmut results --all true` ("<module>.x_<function>__mutmut_<k>: <status>"), groups by module and prints a
markdown table: killed (a test failed, or the mutant timed out: mutmut's convention; timeouts are also shown apart),
survived, no tests (no selected test reaches the
function), not checked (not run yet, e.g. a sampled run), and the score killed / checked, counting "no tests" as
survivors. Writes the same numbers to mutants/mutation_report.json.
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


def main() -> int:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    markdown, report = table(read_results(mutmut))
    Path("mutants").mkdir(exist_ok=True)
    Path("mutants/mutation_report.json").write_text(json.dumps(report, indent=2))
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
