"""PubMedVision (`PubMedVision_Alignment_VQA.json` or `_InstructionTuning_VQA.json`): image-text pairs for Stage I.

Each record has a list of images and a LLaVA-style conversation (human, then gpt; the first pair is used). Images
are passed as images, so any literal `<image>` tokens in the human turn are removed (their count may not exceed the
image count). `modalities` keeps only records whose `modality` contains one of the given words (e.g. the radiology +
pathology subset).
"""

from __future__ import annotations

from pathlib import Path

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import BadRecords, Benchmark, image_path, read_json_list, require, source_folder

FOLDERS = ("pubmedvision", "PubMedVision")


def load(data_root: Path, store, bad: BadRecords, file: str = "PubMedVision_Alignment_VQA.json",
         modalities: tuple[str, ...] = (), folder: str | None = None) -> Benchmark:
    root = source_folder(data_root, FOLDERS, folder)
    path = root / file
    if not path.is_file():
        raise DataError(f"{path}: PubMedVision file not found")
    records = read_json_list(path)
    samples, excluded = [], {"modality not selected": 0}
    wanted = tuple(m.lower() for m in modalities)
    for index, record in enumerate(records):
        rid = str(record.get("id", f"pubmedvision-{index}")) if isinstance(record, dict) else str(index)
        where = f"{path}, record {index + 1} (id {rid!r})"
        try:
            if wanted and not any(w in str(require(record, "modality", where, str)).lower() for w in wanted):
                excluded["modality not selected"] += 1
                continue
            samples.append(_sample(record, rid, root, where))
        except DataError as err:
            bad.handle(err, rid)
    definition = "image-text pairs (caption answers)" + (f"; modality contains {modalities}" if modalities else "")
    return Benchmark("pubmedvision", str(path), definition, samples, len(records), excluded, bad.skipped)


def _sample(record: dict, rid: str, root: Path, where: str) -> Sample:
    images = [image_path(root, str(p), where, "image") for p in require(record, "image", where, list)]
    if not images:
        raise DataError(f"{where}: field 'image' is empty")
    turns = require(record, "conversations", where, list)
    human = next((t for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise DataError(f"{where}: field 'conversations' needs a 'human' and a 'gpt' turn")
    question = require(human, "value", where + ", human turn", str)
    if question.count("<image>") > len(images):
        raise DataError(f"{where}: field 'conversations' has {question.count('<image>')} <image> tokens for "
                        f"{len(images)} images")
    question = question.replace("<image>", "").strip()
    return Sample(rid, images, question, require(gpt, "value", where + ", gpt turn", str).strip(), "caption",
                  modality=str(record.get("modality", "")), groups={"body_part": str(record.get("body_part", ""))})
