"""PubMedVision (`PubMedVision_Alignment_VQA.json` or `_InstructionTuning_VQA.json`): image-text pairs for Stage I.

Each record has a list of images and a LLaVA-style conversation of alternating human and gpt turns. Every
(human, gpt) pair becomes a sample (InstructionTuning records hold several): the first keeps the record's id, pair k
gets `<id>-turn<k>` and carries the earlier pairs as context before its question ("Earlier in this conversation:"),
so a follow-up question keeps what it refers to. Images are passed as images, so literal `<image>` tokens in the human
turns are removed (their count may not exceed the image count). `modalities` keeps only records whose `modality`
contains one of the given words (e.g. the radiology + pathology subset).

`rationale="sentences"` (for the baselines that learn reasoning steps: CoT-SFT, Coconut, IVT-LR; the corpus has no
rationales): an answer of two or more sentences becomes steps = every sentence but the last and answer = the last
sentence (PubMedVision answers describe the findings, then conclude); a one-sentence answer keeps no steps. Sentences
end at ".", "!" or "?" followed by white space and an upper-case letter or a digit, a simple rule that splits
"e.g. The" wrongly and "3.5 cm" rightly; it is a documented choice, not a clinical parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medsynapse.data.schema import DataError, Sample
from medsynapse.data.sources.common import BadRecords, Benchmark, image_path, read_json_list, require, source_folder

FOLDERS = ("pubmedvision", "PubMedVision")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def load(data_root: Path, store, bad: BadRecords, file: str = "PubMedVision_Alignment_VQA.json",
         modalities: tuple[str, ...] = (), folder: str | None = None, rationale: str = "") -> Benchmark:
    if rationale not in ("", "sentences"):
        raise ValueError(f"pubmedvision: option rationale {rationale!r}: expected 'sentences' or empty")
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
            samples += _samples(record, rid, root, where, rationale == "sentences")
        except DataError as err:
            bad.handle(err, rid)
    definition = ("image-text pairs (caption answers), one per question-answer pair of each conversation"
                  + (f"; modality contains {modalities}" if modalities else ""))
    return Benchmark("pubmedvision", str(path), definition, samples, len(records), excluded, bad.skipped)


def sentence_steps(text: str) -> tuple[list[str], str]:
    """(every sentence but the last, the last sentence) of `text`; ([], text) for a single sentence."""
    sentences = [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]
    if len(sentences) < 2:
        return [], text.strip()
    return sentences[:-1], sentences[-1]


def _samples(record: dict, rid: str, root: Path, where: str, steps: bool = False) -> list[Sample]:
    images = [image_path(root, str(p), where, "image") for p in require(record, "image", where, list)]
    if not images:
        raise DataError(f"{where}: field 'image' is empty")
    turns = require(record, "conversations", where, list)
    pairs = _pairs(turns, where)
    tokens = sum(str(human).count("<image>") for human, _ in pairs)
    if tokens > len(images):
        raise DataError(f"{where}: field 'conversations' has {tokens} <image> tokens for {len(images)} images")
    extra: dict[str, Any] = {"modality": str(record.get("modality", "")),
                             "groups": {"body_part": str(record.get("body_part", ""))}}
    context: list[str]
    samples, context = [], []
    for k, (human, gpt) in enumerate(pairs, start=1):
        question = human.replace("<image>", "").strip()
        answer = gpt.strip()
        asked = question if not context else "Earlier in this conversation:\n" + "\n".join(context) + "\n\n" + question
        rationale, target = sentence_steps(answer) if steps else ([], answer)
        samples.append(Sample(rid if k == 1 else f"{rid}-turn{k}", images, asked, target, "caption",
                              rationale=rationale, **extra))
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
