"""A real run file's preparation, before its trainings: what a study (and so `medsynapse pipeline`) runs first for a
run file without a `synthmed` section.

Plan, each step recorded in OUTPUT/prepare.json (atomically, after every step) with its settings and wall time:
1. `convert`: the corpora named in `data.stage1_corpora` / `data.stage2_corpora` (and `rationale_corpora`) into the
   training files (data/corpora.py; nothing to do when the run names its files), with a per-corpus report, and the
   baselines' file (the union of both stages' files) when the run gives none;
2. `cache`: the prior encoder's features of every training image into `data.prior_cache` (nothing when unset; the
   cache is keyed inside by encoder and image bytes, so a rerun only encodes what is missing).
A step recorded with the same settings is kept. A `convert` recorded with other settings is refused, naming the keys
that differ: its files would change under the trainings that read them (use another output, or
`pipeline --from convert`, which forgets it (forget_steps) and removes the later trainings). A
`cache` with other settings simply runs again. The record also holds the package versions and the training files'
SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path

from medsynapse.eval.report import write_json
from medsynapse.locking import write_text_atomic
from medsynapse.runconfig import RunConfig, baseline_file, rationale_file, stage1_file, stage2_file

STEPS = ("convert", "cache")
RECORD = "prepare.json"


def file_sha256(path: str) -> str | None:
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_files(run: RunConfig) -> list[str]:
    """Every file a stage or a baseline of the run trains on (the stages' first)."""
    return list(dict.fromkeys(f for f in (stage1_file(run), stage2_file(run), baseline_file(run),
                                          rationale_file(run)) if f))


def step_settings(run: RunConfig, step: str) -> dict:
    """What a step's result depends on (compared with the record before the step is kept), as plain JSON."""
    d = run.data
    if step == "convert":
        settings = {"data_root": d.data_root, "subset_seed": d.subset_seed, "skip_bad": d.skip_bad,
                    "stage1": [dataclasses.asdict(c) for c in d.stage1_corpora],
                    "stage2": [dataclasses.asdict(c) for c in d.stage2_corpora], "files": training_files(run),
                    **({"rationale": [dataclasses.asdict(c) for c in d.rationale_corpora]}
                       if d.rationale_corpora else {})}
    else:
        settings = {"encoder": run.model.encoder, "files": training_files(run), "prior_cache": d.prior_cache}
    return json.loads(json.dumps(settings, default=str))


def write_union(files: list[str], output: str) -> dict:
    """The baselines' file: every record of `files` in order (atomically), with the count from each."""
    counts, lines = {}, []
    for file in files:
        text = Path(file).read_text()
        kept = [line for line in text.splitlines() if line.strip()]
        counts[file] = len(kept)
        lines += kept
    write_text_atomic(output, "".join(line + "\n" for line in lines))
    return {"files": counts, "records": len(lines)}


def convert(run: RunConfig) -> dict | None:
    """Step 1; returns its per-corpus report (None: the run names its files)."""
    from medsynapse.data.corpora import write_training_file

    d, report = run.data, {}
    for name, specs, file in (("stage1", d.stage1_corpora, stage1_file(run)),
                              ("stage2", d.stage2_corpora, stage2_file(run))):
        if specs:
            report[name] = write_training_file(specs, d.data_root, file, d.subset_seed, d.skip_bad)
    if d.rationale_corpora:
        report["rationale"] = write_training_file(d.rationale_corpora, d.data_root, rationale_file(run),
                                                  d.subset_seed, d.skip_bad)
    if not d.baseline_file and baseline_file(run) not in (stage1_file(run), stage2_file(run)):  # both stages' files
        report["baselines"] = write_union([stage1_file(run), stage2_file(run)], baseline_file(run))
    return report or None


def cache(run: RunConfig) -> None:
    """Step 2."""
    if run.data.prior_cache:
        from medsynapse.recipes.priors import cache_features

        for file in training_files(run):
            cache_features(run.model.encoder, file, run.data.prior_cache)


def forget_steps(run: RunConfig, step: str) -> None:
    """Drop `step` and the later steps from the record: they run again (their files are rewritten in place)."""
    path = Path(run.output) / RECORD
    if path.is_file():
        record = json.loads(path.read_text())
        for later in STEPS[STEPS.index(step):]:
            record["steps"].pop(later, None)
        write_json(path, record)


def prepare_run(run: RunConfig, until: str = "cache") -> dict:
    """The plan of the module docstring up to `until`; returns the record. Under torchrun the caller runs it on the
    main process first: the others then find every step kept and write nothing."""
    if until not in STEPS:
        raise ValueError(f"prepare: until {until!r}: expected one of {STEPS}")
    path = Path(run.output) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    for step in STEPS[: STEPS.index(until) + 1]:
        settings = step_settings(run, step)
        done = record["steps"].get(step)
        if done is not None and done["settings"] == settings:
            print(f"prepare: {step} already finished, kept")
            continue
        if done is not None and step == "convert":
            changed = sorted(k for k in set(done["settings"]) | set(settings)
                             if done["settings"].get(k) != settings.get(k))
            raise ValueError(f"{path}: step 'convert' finished with other settings ({', '.join(changed)} differ); "
                             "use another output or --from convert")
        print(f"prepare: {step} ...", flush=True)
        began = time.perf_counter()
        report = convert(run) if step == "convert" else None
        if step == "cache":
            cache(run)
        record["steps"][step] = {"settings": settings, "seconds": round(time.perf_counter() - began, 2),
                                 **({"report": report} if report else {})}
        record.update(config=run.source, versions={p: version(p) for p in ("medsynapse", "torch", "transformers")},
                      data_sha256={f: file_sha256(f) for f in training_files(run)})
        write_json(path, record)
    return record
