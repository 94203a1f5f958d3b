"""Check that a change of code changes no number: the same small SynthMed demo run with two source trees, compared.

Plan: run `medsynapse demo` at small settings (a few steps per stage, every stage, the controls and the
diagnostics, with `--ablations` its Stage II and III ablations; no timing runs) once with each tree's `src/` first on
the path, into OUT/a and OUT/b, each with its own cache (each tree builds its own data, tiny VLM, base preparation and
encoder, so a change in those builders is compared too); then compare results.json without its timings, every
prediction file and every weight file byte for byte. Prints one line per difference and exits 1 if there is any
(~1.5 min here).

    python scripts/same_demo.py --a /path/to/old/checkout --b . --out /tmp/same_demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SMALL = ["train_images=24", "test_images=6", "base_steps=6", "base_vision_steps=6", "encoder_steps=6",
         "stage1.max_steps=6", "stage1.batch_size=4", "stage2.max_steps=3", "stage2.batch_size=2",
         "stage3.max_steps=3", "stage3.batch_size=4", "efficiency_samples=0", "eval_batch_size=8"]
MEASURED = ("timing_s", "efficiency", "config")  # what measures time or echoes paths, not what the models do


def run_demo(tree: Path, out: Path, config: Path, ablations: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "medsynapse.cli", "demo", "--config", str(config), "--output", str(out / "run"),
               "--cache-dir", str(out / "cache"), *(["--ablations"] if ablations else []), "--set", *SMALL]
    with (out / "log.txt").open("w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=out)


def numbers(results: dict) -> dict:
    """results.json without what measures time or echoes paths."""
    kept = {k: v for k, v in results.items() if k not in MEASURED}
    kept["claims"] = {k: v for k, v in kept.get("claims", {}).items() if "latency" not in k}
    causal = kept.get("stage2_causal_reward")
    if isinstance(causal, dict):
        kept["stage2_causal_reward"] = {k: v for k, v in causal.items() if not k.endswith("seconds_this_run")}
    return kept


def differences(a: Path, b: Path) -> list[str]:
    found = []
    if numbers(json.loads((a / "results.json").read_text())) != numbers(json.loads((b / "results.json").read_text())):
        found.append("results.json (without timings)")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "checkpoints" not in p.parts
                   and (p.suffix == ".safetensors" or p.name.startswith("predictions_")))
    for name in files:
        if not (b / name).is_file() or (b / name).read_bytes() != (a / name).read_bytes():
            found.append(str(name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, type=Path, help="a checkout (its src/ is used)")
    parser.add_argument("--b", default=Path("."), type=Path)
    parser.add_argument("--out", default=Path("/tmp/same_demo"), type=Path)
    parser.add_argument("--ablations", action="store_true", help="the demo's Stage II and III ablations too")
    args = parser.parse_args()
    config = (Path(__file__).resolve().parents[1] / "configs" / "synthmed.yaml").resolve()
    shutil.rmtree(args.out, ignore_errors=True)
    for name, tree in (("a", args.a), ("b", args.b)):
        (args.out / name).mkdir(parents=True)
        run_demo(tree.resolve(), args.out / name, config, args.ablations)
    found = differences(args.out / "a" / "run", args.out / "b" / "run")
    for item in found:
        print(f"differs: {item}")
    compared = sum(1 for p in (args.out / "a" / "run").rglob("*") if p.is_file())
    print("same numbers, predictions and weights" if not found else f"{len(found)} difference(s)",
          f"({compared} files in the first run)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
