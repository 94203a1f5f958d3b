"""The wheel carries what an installed `medsynapse` needs outside a checkout: its configs.

Plan: build the wheel from a copy of the sources (pip, no build isolation, nothing written into the checkout), install
it into a fresh virtual environment whose only other packages are this environment's dependencies (a `.pth` line, so
nothing is downloaded and the checkout's editable install is not visible), then, from an empty folder outside the
checkout, run `medsynapse config show` on bundled configs by name, plan the bundled study, and run the demo's first
step (SynthMed's data) with the bundled run file's settings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`command` with this environment minus PYTHONPATH (which could point at a checkout's sources)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh environment's bin folder, an empty working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(source)], cwd=tmp)
    wheel = next((tmp / "dist").glob("medsynapse-*.whl"))
    environment = tmp / "venv"
    run([sys.executable, "-m", "venv", str(environment)], cwd=tmp)
    site = next((environment / "lib").glob("python3.*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(environment / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return environment / "bin", work


def test_wheel_lists_every_config():
    """Every YAML under configs/ is named by the package data patterns (checked on the file list, no build)."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medsynapse"]
    package = ROOT / "src" / "medsynapse"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert shipped == set((ROOT / "configs").resolve().rglob("*.yaml"))


def test_installed_wheel_runs_outside_the_checkout(installed):
    bin_folder, work = installed
    python = str(bin_folder / "python")
    where = run([python, "-c", "import medsynapse, pathlib; print(pathlib.Path(medsynapse.__file__).resolve())"],
                cwd=work).stdout.strip()
    assert str(ROOT) not in where and "site-packages" in where, where


    for name in ("synthmed.yaml", "configs/synthmed.yaml"):  # the demo's default path, from any folder
        shown = json.loads(run([str(bin_folder / "medsynapse"), "config", "show", name], cwd=work).stdout)
        assert shown["output"] == "runs/demo" and shown["synthmed"]["train_images"] == 1000

    plan = json.loads(run([str(bin_folder / "medsynapse"), "study", "--config", "study-synthmed.yaml", "--plan",
                           "--json"], cwd=work).stdout)
    assert len(plan["rows"]) == 22

    first_step = (
        "from medsynapse.config import find_config\n"
        "from medsynapse.runconfig import read_run_config\n"
        "from medsynapse.steps.synthmed import demo_settings\n"
        "from medsynapse.data.synthmed import generate_split\n"
        "settings = demo_settings(read_run_config(find_config('configs/synthmed.yaml')))\n"
        "print(generate_split('data', 'train', 3, settings.data_seed, settings.image_size))\n"
    )
    written = Path(work / run([python, "-c", first_step], cwd=work).stdout.strip())
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert records and all((work / "data" / r["images"][0]).is_file() for r in records)
