"""A sample list with processed prompts cached per sample, so images go through the processor once per run."""

from __future__ import annotations

import dataclasses

from PIL import Image

from medsynapse.answers import format_prompt, reasoning_target
from medsynapse.data.images import load_image
from medsynapse.data.schema import DataError, Sample, read_samples
from medsynapse.model.vlm import EncodedPrompt, PromptBuilder


class VQADataset:
    def __init__(self, samples: list[Sample], prompts: PromptBuilder, with_answers: bool = True):
        self.samples = samples
        self.prompts = prompts
        self.with_answers = with_answers
        self._encoded: dict[int, EncodedPrompt] = {}
        self._images: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def derived(self, samples: list[Sample], prompts: PromptBuilder) -> VQADataset:
        """A dataset of other texts on the same images (e.g. a curriculum stage's targets and slots) that shares
        this one's decoded images, so every image is read once for all of them."""
        other = VQADataset(samples, prompts, self.with_answers)
        other._images = self._images
        return other

    def images(self, index: int) -> list[Image.Image]:
        sample = self.samples[index]
        out = []
        for path in sample.images:
            if path not in self._images:
                self._images[path] = load_image(path, sample)
            out.append(self._images[path])
        return out

    def encoded(self, index: int) -> EncodedPrompt:
        if index not in self._encoded:
            sample = self.samples[index]
            answer = sample.answer if self.with_answers else None
            self._encoded[index] = self.prompts.encode(self.images(index), sample.model_prompt, answer,
                                                      sample.system)
        return self._encoded[index]

    def validate(self) -> None:
        """Load every image now: a corrupt file stops the run before training starts, naming file and record."""
        for index in range(len(self)):
            self.images(index)


def check_image_limit(samples: list[Sample], limit: int | None, source: str) -> None:
    """A DataError naming the first record with more images than the memory tells apart (`limit`; None: any)."""
    if limit is None:
        return
    for sample in samples:
        if len(sample.images) > limit:
            raise DataError(f"{source}: record id {sample.id!r}, field 'images': {len(sample.images)} images, more "
                            f"than the {limit} this model's memory tells apart (model.max_images)")


def with_answer_format(samples: list[Sample], answer_format: str) -> list[Sample]:
    """The samples with their prompts as `answer_format` asks (answers.py); "direct" leaves them as they
    are."""
    return [dataclasses.replace(s, prompt=format_prompt(s.model_prompt, answer_format)) for s in samples]


def with_reasoning_targets(samples: list[Sample], path: str) -> list[Sample]:
    """The samples with the reasoning steps, then the tagged answer, as the text to learn (CoT-SFT); a sample
    without steps is an error naming it (a silent fallback to the bare answer would train a different row)."""
    missing = [s.id for s in samples if not s.rationale]
    if missing:
        raise ValueError(f"{path}: {len(missing)} sample(s) have no 'rationale' (e.g. id {missing[0]!r}); CoT training "
                         "needs reasoning steps in every record (SynthMed writes them; `medsynapse convert "
                         "--option rationale=sentences` splits PubMedVision answers)")
    return [dataclasses.replace(s, answer=reasoning_target(s.rationale, s.answer)) for s in samples]


def training_dataset(path: str, prompts: PromptBuilder, families: list[str], answer_types: list[str],
                     with_answers: bool, answer_format: str = "direct", target: str = "answer") -> VQADataset:
    """Read a training file, keep the chosen families / answer types (empty = all), check every image up front.
    `target`: "answer" (the gold answer is the text to learn) or "rationale" (the steps, then the tagged answer)."""
    if target not in ("answer", "rationale"):
        raise ValueError(f"target must be 'answer' or 'rationale', got {target!r}")
    samples = read_samples(path)
    if families:
        samples = [s for s in samples if s.family in families]
    if answer_types:
        samples = [s for s in samples if s.answer_type in answer_types]
    if not samples:
        raise ValueError(f"{path}: no samples left after filtering families={families} answer_types={answer_types}")
    if target == "rationale":
        samples = with_reasoning_targets(samples, path)
    if answer_format != "direct":
        samples = with_answer_format(samples, answer_format)
    dataset = VQADataset(samples, prompts, with_answers=with_answers)
    dataset.validate()
    return dataset
