"""PubMedVision (`PubMedVision_Alignment_VQA.json` or `_InstructionTuning_VQA.json`): image-text pairs for Stage I.

Each record has a list of images and a LLaVA-style conversation of alternating human and gpt turns. Every
(human, gpt) pair becomes a sample (InstructionTuning records hold several): the first keeps the record's id, pair k
gets `<id>-turn<k>` and carries the earlier pairs as context before its question ("Earlier in this conversation:"),
so a follow-up question keeps what it refers to. Images are passed as images, so literal `<image>` tokens in the human
turns are removed (their count may not exceed the image count). `modalities` keeps only records whose `modality`
contains one of the given words (e.g. the radiology + pathology subset).
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
            samples += _samples(record, rid, root, where)
        except DataError as err:
            bad.handle(err, rid)
    definition = ("image-text pairs (caption answers), one per question-answer pair of each conversation"
                  + (f"; modality contains {modalities}" if modalities else ""))
    return Benchmark("pubmedvision", str(path), definition, samples, len(records), excluded, bad.skipped)


def _samples(record: dict, rid: str, root: Path, where: str) -> list[Sample]:
    images = [image_path(root, str(p), where, "image") for p in require(record, "image", where, list)]
    if not images:
        raise DataError(f"{where}: field 'image' is empty")
    turns = require(record, "conversations", where, list)
    pairs = _pairs(turns, where)
    tokens = sum(str(human).count("<image>") for human, _ in pairs)
    if tokens > len(images):
        raise DataError(f"{where}: field 'conversations' has {tokens} <image> tokens for {len(images)} images")
    extra = {"modality": str(record.get("modality", "")), "groups": {"body_part": str(record.get("body_part", ""))}}
    samples, context = [], []
    for k, (human, gpt) in enumerate(pairs, start=1):
        question = human.replace("<image>", "").strip()
        answer = gpt.strip()
        asked = question if not context else "Earlier in this conversation:\n" + "\n".join(context) + "\n\n" + question
        samples.append(Sample(rid if k == 1 else f"{rid}-turn{k}", images, asked, answer, "caption", **extra))
        context += [f"Q: {question}", f"A: {answer}"]
    return samples


def _pairs(turns: list, where: str) -> list[tuple[str, str]]:
    """(human, gpt) texts in order; a conversation that does not alternate human, gpt, ... is an error."""
    pairs = []
    for k in range(0, len(turns) - 1, 2):
        human, gpt = turns[k], turns[k + 1]
        if not (isinstance(human, dict) and human.get("from") == "human" and isinstance(gpt, dict)
                and gpt.get("from") == "gpt"):
            raise DataError(f"{where}: field 'conversations' turns {k + 1}-{k + 2} are not a human then a gpt turn")
        pairs.append((require(human, "value", f"{where}, turn {k + 1}", str),
                      require(gpt, "value", f"{where}, turn {k + 2}", str)))
    if not pairs:
        raise DataError(f"{where}: field 'conversations' needs a 'human' and a 'gpt' turn")
    if len(turns) % 2:
        raise DataError(f"{where}: field 'conversations' ends with an unanswered turn {len(turns)}")
    return pairs
