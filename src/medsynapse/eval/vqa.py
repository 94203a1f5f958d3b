"""Accuracy of a MedSynapseV model on a list of samples: batched, left-padded greedy generation, shared extraction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from medsynapse.answers import is_correct
from medsynapse.data.dataset import VQADataset, with_answer_format
from medsynapse.data.schema import Sample
from medsynapse.model.medsynapse import MedSynapseV


@torch.no_grad()
def evaluate(model: MedSynapseV, samples: list[Sample], branch: str | None = None, intervention: str = "zero",
             batch_size: int = 64, max_new_tokens: int = 8, desc: str = "eval",
             memory_transform: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
             answer_format: str | None = None) -> dict:
    """Returns accuracy, n, unparseable count, per-question-type accuracy and the per-sample predictions.

    `branch`: None = the model's own memory (A_psi for an encoder-free student, else P_phi), or "privileged",
    "counterfactual" (M' with `intervention`), "autonomous".
    `memory_transform(memory, indices)`: replaces each batch's memory (B, N, H) by what it returns before generation;
    `indices` are the positions in `samples` of the batch's rows (eval/diagnostics.py). None: the memory as is.
    """
    model.eval()
    answer_format = answer_format or model.answer_format  # None: as the model was trained to reply
    if answer_format != "direct":
        samples = with_answer_format(samples, answer_format)
    dataset = VQADataset(samples, model.prompts, with_answers=False)
    predictions: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        indices = list(range(start, min(start + batch_size, len(samples))))
        transform = None
        if memory_transform is not None:
            def transform(memory, indices=indices):
                return memory_transform(memory, indices)
        images = [img for i in indices for img in dataset.images(i)]  # every image: the memory reads them all
        texts = model.answer_encoded([dataset.encoded(i) for i in indices], images, max_new_tokens, branch,
                                     intervention, memory_transform=transform)
        for i, text in zip(indices, texts):
            sample = samples[i]
            correct, got = is_correct(text, sample.answer, sample.answer_type, sample.options, answer_format)
            predictions.append({"id": sample.id, "question_type": sample.question_type, "raw": text,
                                "extracted": got.answer, "rule": got.rule, "gold": sample.answer, "correct": correct})
    by_type: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_type[p["question_type"]].append(p["correct"])
    n = len(predictions)
    return {"accuracy": sum(p["correct"] for p in predictions) / max(n, 1), "n": n,
            "unparseable": sum(p["extracted"] is None for p in predictions),
            "by_question_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
            "predictions": predictions}
