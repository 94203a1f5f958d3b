"""SynthMed: a deterministic synthetic medical VQA task that runs the whole pipeline on a laptop.

Each image is a procedural "scan" in one of four styles (CT, MRI, X-ray, pathology) with organs and 0-3 small lesions
whose ground-truth mask is saved. The lesion questions (presence, count, location, size, density) depend on a few
pixels that the coarse VLM tokens blur away, while the prior encoder, trained on the masks, sees them: that is what
makes every stage's effect measurable and the counterfactual (masking the encoder's region) remove real evidence.

Two question families:
- ``general``: modality, body region, organ count, plain captions. Used to prepare the base VLM (answer format and
  general content).
- ``lesion``: the diagnostic questions; never shown to the base VLM; the held-out test split measures them.
Train and test images are generated from disjoint seeds, so the splits never share an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsynapse.data.schema import Sample, write_samples

SYNTHMED_VERSION = 3  # bump when generated images or questions change: invalidates cached demo data (3: rationales)
MODALITIES = ("CT", "MRI", "X-ray", "pathology")
REGION = {"CT": "abdomen", "MRI": "brain", "X-ray": "chest", "pathology": "tissue"}
NUMBER_WORDS = ("zero", "one", "two", "three")
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
LETTERS = "ABCD"
INSTRUCTION = {
    "yes_no": "Answer yes or no.",
    "multiple_choice": "Answer with the option letter.",
    "open": "Answer with one word.",
    "caption": "",
}


@dataclass(frozen=True)
class Lesion:
    y: float
    x: float
    radius: float


@dataclass(frozen=True)
class Scan:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    modality: str
    organs: int
    lesions: tuple[Lesion, ...]
    density: str  # "hyperdense" | "hypodense"


def _disk(size: int, cy: float, cx: float, ry: float, rx: float | None = None) -> np.ndarray:
    rx = ry if rx is None else rx
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _quadrant(lesion: Lesion, size: int) -> str:
    top = lesion.y < size / 2
    left = lesion.x < size / 2
    return QUADRANTS[(0 if top else 2) + (0 if left else 1)]


def render_scan(rng: np.random.Generator, size: int = 64, paint_lesions: bool = True) -> Scan:
    """Draw one scan; every random choice comes from `rng`, so a seed fixes the image.

    `paint_lesions=False` draws the scan's healthy twin: the same random choices (anatomy, lesion positions, noise)
    with the lesions left unpainted, i.e. the image as it would be without the finding (the ground-truth
    counterfactual, used to measure how much an intervention leaves behind).
    """
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    c = size / 2
    body = _disk(size, c, c, size * 0.44, size * 0.40)
    if modality == "pathology":
        canvas[:] = (0.92, 0.72, 0.82)
        for _ in range(int(rng.integers(25, 40))):
            nucleus = _disk(size, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.0, 1.8))
            canvas[nucleus] = (0.55, 0.35, 0.65)
        organs = 0
        tissue = canvas.mean(-1)
        body = np.ones_like(body)
    else:
        base = {"CT": 0.42, "MRI": 0.30, "X-ray": 0.70}[modality]
        canvas[body] = base
        if modality == "X-ray":
            organs = 2
            for side in (-1, 1):
                lung = _disk(size, c - 2, c + side * size * 0.19, size * 0.27, size * 0.13)
                canvas[lung] = 0.22
            for rib in range(4):
                canvas[int(size * 0.22 + rib * size * 0.14), 6 : size - 6] += 0.08
        else:
            organs = int(rng.integers(1, 4))
            shade = 0.58 if modality == "CT" else 0.72
            for _ in range(organs):
                oy, ox = rng.uniform(size * 0.3, size * 0.7, size=2)
                canvas[_disk(size, oy, ox, rng.uniform(6, 11), rng.uniform(6, 11)) & body] = shade
            if modality == "MRI":
                ring = body & ~_disk(size, c, c, size * 0.40, size * 0.36)
                canvas[ring] = 0.85
        tissue = canvas.mean(-1)

    n_lesions = int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15]))
    density = "hyperdense" if rng.random() < 0.5 else "hypodense"
    lesions: list[Lesion] = []
    mask = np.zeros((size, size), dtype=bool)
    margin = 6.0
    tries = 0
    while len(lesions) < n_lesions and tries < 200:
        tries += 1
        radius = float(rng.choice([2.0, 2.5, 4.0, 4.5]))
        y, x = rng.uniform(margin + 2, size - margin - 2, size=2)
        if abs(y - c) < radius + 3 or abs(x - c) < radius + 3 or not body[int(y), int(x)]:
            continue  # keep lesions clear of the midlines (unambiguous quadrant) and inside the body
        if any((y - o.y) ** 2 + (x - o.x) ** 2 < (radius + o.radius + 3) ** 2 for o in lesions):
            continue
        lesions.append(Lesion(float(y), float(x), radius))
        mask |= _disk(size, y, x, radius)
    if paint_lesions and modality == "pathology":
        colour = (0.35, 0.15, 0.45) if density == "hyperdense" else (1.0, 0.95, 0.97)
        canvas[mask] = colour
    elif paint_lesions:
        delta = 0.32 if density == "hyperdense" else -0.30
        canvas[mask] = np.clip(tissue[mask] + delta, 0.0, 1.0)[:, None]
    noise = rng.normal(0.0, 0.03, size=(size, size, 1)).astype(np.float32)
    image = np.clip(canvas + noise, 0.0, 1.0)
    return Scan((image * 255).round().astype(np.uint8), mask, modality, organs, tuple(lesions), density)


def _mc(options: list[str], correct: str) -> tuple[str, dict[str, str], str]:
    letters = {LETTERS[i]: text for i, text in enumerate(options)}
    listing = " ".join(f"{k}. {v}" for k, v in letters.items())
    return f"Options: {listing}", letters, LETTERS[options.index(correct)]


def questions_for(scan: Scan, size: int) -> list[dict]:
    """Every question SynthMed asks about one scan (text, answer, type, family)."""
    qs: list[dict] = []

    def add(family: str, qtype: str, atype: str, question: str, answer: str, options: dict | None = None):
        qs.append(dict(family=family, question_type=qtype, answer_type=atype, question=question, answer=answer,
                       options=options or {}))

    mod = scan.modality
    text, opts, ans = _mc(list(MODALITIES), mod)
    add("general", "modality", "multiple_choice", f"Which imaging modality is this? {text}", ans, opts)
    other = MODALITIES[(MODALITIES.index(mod) + 1 + len(scan.lesions)) % 4]
    probe = mod if len(scan.lesions) % 2 == 0 else other
    add("general", "modality", "yes_no", f"Is this a {probe} image?", "yes" if probe == mod else "no")
    add("general", "region", "open", "Which body region is shown?", REGION[mod])
    add("general", "organ_count", "open", "How many organs are visible?", NUMBER_WORDS[scan.organs])

    n = len(scan.lesions)
    add("lesion", "presence", "yes_no", "Is there a lesion in this image?", "yes" if n else "no")
    add("lesion", "count", "open", "How many lesions are visible?", NUMBER_WORDS[n])
    quads = {_quadrant(les, size) for les in scan.lesions}
    asked = QUADRANTS[(n * 7 + int(scan.image[0, 0, 0])) % 4]
    add("lesion", "location", "yes_no", f"Is there a lesion in the {asked} quadrant?",
        "yes" if asked in quads else "no")
    if n:
        largest = max(scan.lesions, key=lambda les: les.radius)
        text, opts, ans = _mc(list(QUADRANTS), _quadrant(largest, size))
        add("lesion", "location", "multiple_choice", f"Where is the largest lesion? {text}", ans, opts)
        size_word = "large" if largest.radius >= 4 else "small"
        text, opts, ans = _mc(["small", "large"], size_word)
        add("lesion", "size", "multiple_choice", f"What is the size of the largest lesion? {text}", ans, opts)
        text, opts, ans = _mc(["hyperdense", "hypodense"], scan.density)
        add("lesion", "density", "multiple_choice", f"What is the density of the lesions? {text}", ans, opts)
    return qs


def caption_for(scan: Scan, size: int, with_lesions: bool) -> str:
    text = f"A {scan.modality} image of the {REGION[scan.modality]}"
    if not with_lesions:
        return text + "."
    n = len(scan.lesions)
    if n == 0:
        return text + " with no lesion."
    largest = max(scan.lesions, key=lambda les: les.radius)
    size_word = "large" if largest.radius >= 4 else "small"
    noun = "lesion" if n == 1 else "lesions"
    return (f"{text} with {NUMBER_WORDS[n]} {scan.density} {noun}; the largest is {size_word} "
            f"in the {_quadrant(largest, size)} quadrant.")


def rationale_for(scan: Scan, size: int) -> list[str]:
    """The reasoning steps behind every question on a scan (CoT-SFT, Coconut and IVT-LR train on them): modality and
    region, then the finding, then where the largest lesion is. Words from the captions only, so the tiny tokenizer
    (trained on `corpus_lines`) needs no new vocabulary."""
    steps = [f"A {scan.modality} image of the {REGION[scan.modality]}."]
    n = len(scan.lesions)
    if n == 0:
        return [*steps, "There is no lesion."]
    noun = "lesion" if n == 1 else "lesions"
    largest = max(scan.lesions, key=lambda les: les.radius)
    size_word = "large" if largest.radius >= 4 else "small"
    return [*steps, f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {scan.density} {noun}.",
            f"The largest is {size_word} in the {_quadrant(largest, size)} quadrant."]


def generate_split(out_dir: str | Path, split: str, n_images: int, seed: int, size: int = 64) -> Path:
    """Write `n_images` scans, their masks and all questions as `<split>.jsonl`; returns the file path.

    Seeds are (seed, split id, image index), so the train and test splits never share an image.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    split_id = {"train": 0, "test": 1, "val": 2}[split]
    samples: list[Sample] = []
    for index in range(n_images):
        rng = np.random.default_rng([seed, split_id, index])
        scan = render_scan(rng, size)
        stem = f"{split}_{index:05d}"
        Image.fromarray(scan.image).save(out_dir / "images" / f"{stem}.png")
        Image.fromarray((scan.mask * 255).astype(np.uint8)).save(out_dir / "masks" / f"{stem}.png")
        common: dict[str, Any] = dict(images=[f"images/{stem}.png"], modality=scan.modality, mask=f"masks/{stem}.png")
        rationale = rationale_for(scan, size)
        for q_index, q in enumerate(questions_for(scan, size)):
            instruction = INSTRUCTION[q["answer_type"]]
            samples.append(Sample(id=f"{stem}_q{q_index}", question=f"{q['question']} {instruction}".strip(),
                                  answer=q["answer"], answer_type=q["answer_type"], options=q["options"],
                                  question_type=q["question_type"], family=q["family"], rationale=rationale,
                                  **common))
        for family, with_lesions in (("general", False), ("lesion", True)):
            samples.append(Sample(id=f"{stem}_cap_{family}", question="Describe the image.",
                                  answer=caption_for(scan, size, with_lesions), answer_type="caption",
                                  question_type="caption", family=family, **common))
    path = out_dir / f"{split}.jsonl"
    write_samples(path, samples)
    return path


def corpus_lines() -> list[str]:
    """Text that covers every word SynthMed can emit: the tiny tokenizer is trained on it."""
    rng = np.random.default_rng(12345)
    lines: list[str] = []
    for index in range(300):
        scan = render_scan(np.random.default_rng([999, index]), 64)
        for q in questions_for(scan, 64):
            lines.append(f"{q['question']} {INSTRUCTION[q['answer_type']]}")
            lines.append(q["answer"])
        lines.append(caption_for(scan, 64, True))
        lines.append(caption_for(scan, 64, False))
    lines += ["Describe the image.", "yes", "no", *LETTERS, *NUMBER_WORDS, *QUADRANTS, *MODALITIES]
    rng.shuffle(lines)
    return lines
