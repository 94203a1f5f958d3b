"""A systematic mutation sample over every package of `src/medsynapse` (`make mutation-sample`).

Plan:
1. Map: run the whole suite once under coverage with one context per test (`coverage run`, `dynamic_context =
   test_function`; on the suite's pytest-xdist workers, their data combined), keeping each test's duration (junit
   XML). Reused while `mutants-sample/map.json` exists.
2. Enumerate every mutant of every module with mutmut's own operators (`create_mutations`: the same mutants
   `make mutation` tests), in file and source order.
3. Sample: per package (`medsynapse` top level and every subpackage found under src/medsynapse: cli, data, engines,
   eval, model, objectives, recipes, steps) a fixed number, every k-th mutant from a seeded start (systematic, so the
   sample spreads over the modules in proportion to their size); `--packages` keeps some of them (a rerun over the
   packages a change touched).
4. Test each sampled mutant in a private copy of the repository: the mutated file written in, `pytest -x` on the tests
   that executed the mutated line (fastest first), with a time limit from their measured durations. A line no test
   executed in-process (e.g. only in a served subprocess) falls back to the test files that import the module.
   A mutant whose selected tests all skip, or with no test here in a module that imports vLLM (its tests run only
   in `.venv-vllm`), is recorded as `skipped`: undecided, counted, never a kill.
5. Record one JSON line per mutant (resumable: a rerun skips mutants already recorded) with its diff;
   `scripts/mutation_report.py` prints the score per package with its interval and lists the survivors.

Why not `mutmut run` itself (kept as `make mutation` for the core modules): before its first mutant it runs the selected
suite twice (stats under trampolines, then a clean run), ~45 min here for every package, and it cannot sample across
packages; it selects tests per function, this per line.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "mutants-sample"
PACKAGE_ROOT = ROOT / "src" / "medsynapse"


def packages() -> tuple[str, ...]:
    """`medsynapse` (the top-level modules) and every subpackage, as the source tree has them now."""
    return ("medsynapse", *sorted(p.parent.name for p in PACKAGE_ROOT.glob("*/__init__.py")))


COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "runs", "mutants", "mutants-sample", "__pycache__",
                                     ".pytest_cache", ".ruff_cache", "*.egg-info")


@dataclass
class Mutant:
    key: str  # "<module path>#<index>"
    package: str
    path: str  # relative to the repository
    line: int
    code: str  # the whole mutated file
    diff: str


# ---- 1. the map: which test executed which line, and how long each test takes ----

def build_map(python: str, workers: int = 2) -> dict:
    """Run the suite once under coverage (one context per test) and keep line -> tests and test -> seconds."""
    OUT.mkdir(exist_ok=True)
    rc = OUT / "coveragerc"
    # the suite's two pytest-xdist workers are subprocesses: coverage follows them (`patch = subprocess`), each
    # writing its own data file (`parallel`), combined below; the test contexts are recorded in the workers
    rc.write_text("[run]\nsource = medsynapse\ndynamic_context = test_function\nparallel = true\n"
                  f"patch = subprocess\ndata_file = {OUT / 'coverage.db'}\n")
    junit = OUT / "junit.xml"
    for stale in OUT.glob("coverage.db*"):
        stale.unlink()
    subprocess.run([python, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-n", str(workers), "--dist", "loadgroup", f"--junitxml={junit}"], cwd=ROOT, check=False)
    subprocess.run([python, "-m", "coverage", "combine", f"--rcfile={rc}", "--keep"], cwd=ROOT, check=True)
    return read_map(OUT / "coverage.db", junit)


def read_map(database: Path, junit: Path) -> dict:
    import coverage

    data = coverage.CoverageData(basename=str(database))
    data.read()
    durations = test_durations(junit)
    lines: dict[str, dict[str, list[str]]] = {}
    for measured in data.measured_files():
        relative = Path(measured).resolve().relative_to(ROOT / "src").as_posix() if "/src/medsynapse/" in measured \
            else None
        if relative is None:
            continue
        by_line: dict[str, set[str]] = {}
        for line, contexts in (data.contexts_by_lineno(measured) or {}).items():
            tests = {node for context in contexts if (node := node_id(context, durations))}
            if tests:
                by_line[str(line)] = tests
        lines["src/" + relative] = {line: sorted(tests) for line, tests in by_line.items()}
    return {"lines": lines, "durations": durations}


def test_durations(junit: Path) -> dict[str, float]:
    """node id ("tests/test_x.py::test_y", parameters dropped) -> seconds, summed over its parameters."""
    durations: dict[str, float] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        file = "/".join(module[:2]) + ".py" if module[0] == "tests" else None
        if file is None:
            continue
        node = f"{file}::{case.get('name', '').split('[')[0]}"
        durations[node] = durations.get(node, 0.0) + float(case.get("time", 0))
    return durations


def node_id(context: str, durations: dict[str, float]) -> str | None:
    """coverage's test_function context ("test_x.test_y" or "test_x.Class.test_y") -> a pytest node id."""
    if not context:
        return None
    module, _, name = context.partition(".")
    node = f"tests/{module}.py::{name.split('.')[-1]}"
    return node if node in durations else None


# ---- 2. the mutants ----

def package_of(path: str) -> str:
    parts = Path(path).parts  # src/medsynapse/<package>/...
    return parts[2] if len(parts) > 3 else "medsynapse"


def mutations_of(path: str) -> list[tuple[str, int]]:
    """(path, index) of every mutation mutmut makes in one module (rendered later, only for the sample)."""
    _, mutations = _parsed(path)
    return [(path, index) for index in range(len(mutations))]


@functools.cache
def _parsed(path: str) -> tuple:
    from mutmut.mutation.file_mutation import create_mutations

    module, mutations, _, _ = create_mutations(path, (ROOT / path).read_text())
    return module, mutations


def render(path: str, index: int) -> Mutant:
    """The mutated file, its diff and the first changed line for mutation `index` of `path`."""
    module, mutations = _parsed(path)
    mutation = mutations[index]
    original = module.code.splitlines(keepends=True)
    lines = module.deep_replace(mutation.original_node, mutation.mutated_node).code.splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(original, lines, f"a/{path}", f"b/{path}", n=1))
    changed = next((i for i, (a, b) in enumerate(zip(original, lines, strict=False)) if a != b),
                   min(len(original), len(lines)))
    return Mutant(f"{path}#{index}", package_of(path), path, changed + 1, "".join(lines), diff)


def systematic_sample(mutants: list, count: int, seed: int) -> list:
    """`count` mutants, every k-th from a seeded start (k = n / count): spread over the package in source order."""
    if len(mutants) <= count:
        return mutants
    step = len(mutants) / count
    start = (seed * 0.6180339887) % 1.0 * step
    return [mutants[int(start + i * step)] for i in range(count)]


# ---- 4. testing one mutant ----

def tests_for(mutant: Mutant, test_map: dict, budget_s: float) -> tuple[list[str], float, str]:
    """The tests that executed the mutated line, fastest first, up to `budget_s` of measured time."""
    durations = test_map["durations"]
    tests = test_map["lines"].get(mutant.path, {}).get(str(mutant.line), [])
    how = "line coverage"
    if not tests:  # a line run at import (a constant, a table) or only in a subprocess: every test of the module
        tests = sorted({node for nodes in test_map["lines"].get(mutant.path, {}).values() for node in nodes})
        how = "module coverage"
    if not tests:  # no line of the module runs in-process: the test files that name it
        dotted = mutant.path.removeprefix("src/").removesuffix(".py").replace("/", ".")
        files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")
                       if dotted in p.read_text())
        tests = [node for node in durations if node.split("::")[0] in files]
        how = "importing files"
    tests = sorted(tests, key=lambda node: durations.get(node, 0.0))
    chosen, total = [], 0.0
    for node in tests:
        if chosen and total + durations.get(node, 0.0) > budget_s:
            how += f", {len(tests) - len(chosen)} slow tests left out"
            break
        chosen.append(node)
        total += durations.get(node, 0.0)
    return chosen, total, how


def untested_status(path: str) -> str:
    """A mutant no test of this environment reaches: `skipped` (undecided) when its module imports vLLM, whose tests
    run only in `.venv-vllm` (`make test-vllm`); otherwise `no tests` (counted as a survivor)."""
    text = (ROOT / path).read_text()
    return "skipped" if "from vllm" in text or "import vllm" in text else "no tests"


def mutant_status(returncode: int, output: str) -> str:
    """pytest's exit status and the end of its output -> killed (a test failed), survived, skipped (every selected
    test skipped: undecided) or error (collection failed, interrupted, ...)."""
    lines = output.strip().splitlines()
    summary = lines[-1] if lines else ""
    if returncode == 0:
        return "skipped" if "skipped" in summary and "passed" not in summary else "survived"
    return "killed" if returncode == 1 else "error"


def run_mutant(mutant: Mutant, workdir: Path, tests: list[str], expected_s: float, python: str) -> dict:
    target = workdir / mutant.path
    original = target.read_text()
    target.write_text(mutant.code)
    env = {**os.environ, "PYTHONPATH": str(workdir / "src"), "MEDSYNAPSE_MUTATION": "1", "TQDM_DISABLE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    limit = 3 * expected_s + 90  # pytest start-up and the session fixtures are not in the measured durations
    started = time.time()
    try:
        result = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                                 *tests], cwd=workdir, env=env, capture_output=True, text=True, timeout=limit)
        tail = result.stdout[-1500:]
        status = mutant_status(result.returncode, tail)
    except subprocess.TimeoutExpired:
        status, tail = "timeout", f"over {limit:.0f} s"
    finally:
        target.write_text(original)
    return {"status": status, "seconds": round(time.time() - started, 1), "output": tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-package", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--packages", nargs="*", default=None, metavar="NAME",
                        help=f"only these packages (default: all of them: {', '.join(packages())})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=150.0, help="measured test seconds per mutant at most")
    parser.add_argument("--remap", action="store_true", help="run the coverage map again")
    parser.add_argument("--retest", nargs="*", default=[], metavar="STATUS",
                        help="test again the recorded mutants of these statuses (e.g. timeout 'no tests')")
    args = parser.parse_args()
    python = sys.executable

    map_file = OUT / "map.json"
    if args.remap or not map_file.exists():
        if (OUT / "coverage.db").exists() and (OUT / "junit.xml").exists() and not args.remap:
            test_map = read_map(OUT / "coverage.db", OUT / "junit.xml")
        else:
            test_map = build_map(python, args.workers)
        map_file.write_text(json.dumps(test_map))
    test_map = json.loads(map_file.read_text())

    known = packages()
    unknown = sorted(set(args.packages or ()) - set(known))
    if unknown:
        parser.error(f"--packages {' '.join(unknown)}: not a package of src/medsynapse ({', '.join(known)})")
    chosen_packages = tuple(args.packages) if args.packages else known
    modules = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE_ROOT.rglob("*.py"))
    by_package: dict[str, list[tuple[str, int]]] = {name: [] for name in known}
    for path in modules:
        by_package[package_of(path)].extend(mutations_of(path))
    chosen = [m for name in chosen_packages for m in systematic_sample(by_package[name], args.per_package, args.seed)]
    sample = [render(path, index) for path, index in chosen]
    totals = {name: len(by_package[name]) for name in known}
    (OUT / "population.json").write_text(json.dumps(totals, indent=2))

    results_file = OUT / "results.jsonl"
    records = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    if args.retest:  # drop those records: they are tested again below
        records = [r for r in records if r["status"] not in args.retest]
        results_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = {r["key"] for r in records}
    todo = [m for m in sample if m.key not in done]
    print(f"{sum(totals.values())} mutants in {len(modules)} modules; sample {len(sample)}, "
          f"{len(sample) - len(todo)} already tested", flush=True)

    workdirs = []
    for k in range(args.workers):
        workdir = Path(tempfile.mkdtemp(prefix=f"medsynapse-mutation-{k}-"))
        shutil.copytree(ROOT, workdir, ignore=COPY_IGNORE, dirs_exist_ok=True)
        workdirs.append(workdir)
    free = list(workdirs)

    def test_one(mutant: Mutant) -> dict:
        workdir = free.pop()
        try:
            tests, expected, how = tests_for(mutant, test_map, args.budget_s)
            outcome = run_mutant(mutant, workdir, tests, expected, python) if tests else \
                {"status": untested_status(mutant.path), "seconds": 0.0, "output": ""}
        finally:
            free.append(workdir)
        record = {"key": mutant.key, "package": mutant.package, "path": mutant.path, "line": mutant.line,
                  "tests": len(tests), "selected_by": how, "diff": mutant.diff, **outcome}
        with results_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"{record['status']:>9} {record['seconds']:6.0f}s {mutant.key} (line {mutant.line}, "
              f"{len(tests)} tests)", flush=True)
        return record

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(test_one, todo))
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
