"""The mutation sample's own logic (scripts/mutation_sample.py, mutation_report.py): every package of the source tree
is sampled (a new subpackage is not a crash or a silent gap), the sample is systematic and repeatable, a mutant whose
tests all skip is undecided rather than a survivor, and the score leaves undecided mutants out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mutation_report  # noqa: E402
import mutation_sample  # noqa: E402


def test_every_module_belongs_to_a_sampled_package():
    known = mutation_sample.packages()
    modules = [p.relative_to(ROOT).as_posix() for p in mutation_sample.PACKAGE_ROOT.rglob("*.py")]
    assert {"cli", "engines", "steps", "data", "recipes"} <= set(known) and known[0] == "medsynapse"
    assert {mutation_sample.package_of(m) for m in modules} == set(known)
    assert mutation_sample.package_of("src/medsynapse/study.py") == "medsynapse"
    assert mutation_sample.package_of("src/medsynapse/data/sources/vqa_rad.py") == "data"


def test_the_sample_is_systematic_and_repeatable():
    population = list(range(1000))
    sample = mutation_sample.systematic_sample(population, 20, seed=1)
    assert len(sample) == 20 and sample == mutation_sample.systematic_sample(population, 20, seed=1)
    gaps = {b - a for a, b in zip(sample, sample[1:], strict=False)}
    assert gaps <= {49, 50, 51}  # every k-th (k = 50), spread over the whole population
    assert sample[0] < 50 and sample != mutation_sample.systematic_sample(population, 20, seed=2)
    assert mutation_sample.systematic_sample(population[:7], 20, seed=1) == population[:7]


@pytest.mark.parametrize(("returncode", "output", "status"), [
    (0, "....\n4 passed in 1.0s", "survived"),
    (0, "..s\n2 passed, 1 skipped in 1.0s", "survived"),
    (0, "s\n1 skipped in 0.5s", "skipped"),
    (1, "F\n1 failed in 0.5s", "killed"),
    (2, "ERROR collecting", "error"),
    (5, "no tests ran", "error"),
])
def test_a_mutant_whose_tests_all_skip_is_undecided(returncode, output, status):
    assert mutation_sample.mutant_status(returncode, output) == status


def test_the_score_counts_killed_over_decided(tmp_path):
    statuses = ["killed"] * 6 + ["survived", "no tests", "timeout", "error", "skipped", "skipped"]
    records = [{"key": f"src/medsynapse/x.py#{i}", "package": "medsynapse", "status": s, "tests": 1,
                "selected_by": "line coverage", "diff": ""} for i, s in enumerate(statuses)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "population.json").write_text(json.dumps({"medsynapse": 500}))
    markdown, report = mutation_report.sample_report(tmp_path)
    row = report["medsynapse"]
    assert (row["killed"], row["skipped"], row["timeout"], row["error"]) == (6, 2, 1, 1)
    assert row["score"] == 6 / 8  # survived and no tests are decided; timeout, error and skipped are not
    assert row["interval"][0] < 0.75 < row["interval"][1]
    assert markdown.count("### ") == 2  # the two survivors' diffs


def test_a_module_whose_tests_need_vllm_is_undecided_not_a_survivor():
    assert mutation_sample.untested_status("src/medsynapse/engines/vllm_engine.py") == "skipped"
    assert mutation_sample.untested_status("src/medsynapse/engines/vllm_model.py") == "skipped"
    assert mutation_sample.untested_status("src/medsynapse/engines/export.py") == "no tests"
    assert mutation_sample.untested_status("src/medsynapse/study.py") == "no tests"
