"""OmniMedVQA (`QA_information/{Open-access,Restricted-access}/*.json`): closed multiple-choice questions for Stage II.

There is no official split. Modality strings vary across files ("CT(Computed Tomography)", "MR (Mag-netic Resonance
Imaging)", "Microscopy Images", ...) and one file spells the key `modality`: they are normalised onto the eight
modalities of the Med-R1 set; with `balance: true` (off by default: it throws away most questions, down to the
rarest modality's count) `balanced` draws the same number of questions from each. `gt_answer` is option text;
it becomes the option's letter. Image paths may start with "/". Only Open-access is read by default (as MedEvalKit
does; the Restricted-access images are not in the public zip).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import (
    BadRecords,
    Benchmark,
    image_path,
    letter_of,
    mcq_sample,
    read_json_list,
    require,
    source_folder,
)

MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "Dermoscopy", "Fundus", "OCT", "Microscopy")
# Order matters: OCT before CT ("optical coherence tomography" also contains "tomography").
_MODALITY_RULES = (
    ("OCT", r"\boct\b|optical coherence"),
    ("CT", r"\bct\b|computed tomography"),
    ("MRI", r"\bmri?\b|mag-?netic resonance"),
    ("X-Ray", r"x-?ray"),
    ("Ultrasound", r"ultrasound|\bus\b|sonograph"),
    ("Dermoscopy", r"dermoscop"),
    ("Fundus", r"fundus"),
    ("Microscopy", r"microscop"),
)

FOLDERS = ("omnimedvqa", "OmniMedVQA")


def normalise_modality(text: str) -> str:
    """One of MODALITIES, or "" for modalities outside the set (e.g. endoscopy)."""
    lowered = text.lower()
    for name, pattern in _MODALITY_RULES:
        if re.search(pattern, lowered):
            return name
    return ""


def load(data_root: Path, store, bad: BadRecords, access: tuple[str, ...] | str = ("Open-access",),
         balance: bool = False, per_modality: int | None = None, seed: int = 0,
         folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    access = (access,) if isinstance(access, str) else tuple(access)
    files = [f for a in access for f in sorted((root / "QA_information" / a).glob("*.json"))]
    if not files:
        raise DataError(f"{root}: no QA_information/<access>/*.json files")
    samples: list[Sample] = []
    n_records, outside = 0, 0
    for path in files:
        records = read_json_list(path)
        n_records += len(records)
        for index, record in enumerate(records):
            rid = record.get("question_id", index) if isinstance(record, dict) else index
            where = f"{path}, record {index + 1} (question_id {rid!r})"
            try:
                sample = _sample(record, root, where)
            except DataError as err:
                bad.handle(err, str(rid))
                continue
            if sample.modality:
                samples.append(sample)
            else:
                outside += 1
    excluded = {"modality outside the eight": outside}
    if per_modality is not None and not balance:
        raise DataError("omnimedvqa: per_modality only applies with balance: true")
    definition = f"closed multiple choice, modalities {', '.join(MODALITIES)}"
    if balance:
        samples, excluded["balancing"] = balanced(samples, per_modality, seed)
        definition += f", balanced ({per_modality or 'min count'} per modality, seed {seed})"
    else:
        definition += ", every question (not balanced)"
    return Benchmark("omnimedvqa", f"{root / 'QA_information'} ({len(files)} files)", definition, samples, n_records,
                     excluded, bad.skipped)


def balanced(samples: list[Sample], per_modality: int | None, seed: int) -> tuple[list[Sample], int]:
    """The same number of questions per present modality (`per_modality`, capped by the rarest), seeded."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.modality].append(sample)
    if not groups:
        return [], 0
    count = min(len(g) for g in groups.values())
    if per_modality is not None:
        count = min(count, per_modality)
    rng = random.Random(seed)
    kept = [s for name in sorted(groups) for s in rng.sample(groups[name], count)]
    return kept, len(samples) - len(kept)


def _sample(record: object, root: Path, where: str) -> Sample:
    raw = record.get("modality_type", record.get("modality")) if isinstance(record, dict) else None
    if not isinstance(raw, str):
        raise DataError(f"{where}: missing field 'modality_type'")
    assert isinstance(record, dict)  # raw is a str only when record is a mapping
    options = {letter: str(record[f"option_{letter}"]) for letter in "ABCD"
               if record.get(f"option_{letter}") not in (None, "")}
    if len(options) < 2:
        raise DataError(f"{where}: fewer than two options (option_A..option_D)")
    image = image_path(root, require(record, "image_path", where, str), where, "image_path")
    answer = letter_of(str(require(record, "gt_answer", where)), options, where)
    return mcq_sample(require(record, "question_id", where, str), [image], require(record, "question", where, str),
                      options, answer, where, modality=normalise_modality(raw),
                      question_type=str(record.get("question_type", "")),
                      groups={"dataset": str(record.get("dataset", "")), "raw_modality": raw})
