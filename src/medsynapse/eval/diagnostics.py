"""Does the model use its memory? Memory-reliance accuracies, collapse, and leak / readability probes.

`medsynapse diagnose --model DIR --data FILE [--train-data FILE]` writes OUT/diagnostics.json and diagnostics.md.

**Reliance** (`reliance_report`): accuracy on the same samples, with the same generation path and the shared answer
extraction (`eval.vqa.evaluate`), when the memory that reaches the VLM is

- ``as_is``: the model's own memory (A_psi for an encoder-free student, else P_phi's privileged memory M);
- ``zeroed``: all zeros;
- ``mean``: the dataset mean memory, the mean over the evaluated *images* (each image once, however many questions
  it has) of the as-is memory recorded in the first (``as_is``) pass;
- ``shuffled``: the as-is memory of *another image*: a fixed, seeded derangement of the unique images (one cycle
  through all of them), so no sample keeps its own image's memory. It is taken across the whole dataset, not across
  a batch: SynthMed asks ~10 questions per image and a batch holds consecutive samples, so a within-batch permutation
  would mostly hand a row a memory of its own image;
- ``counterfactual``: M' = P_phi(S ⊙ ¬B) (``model.memory(prior, "counterfactual", intervention)``); only for a model
  with a prior encoder and a sampler, else None and the reason under ``skipped``;
- ``noise``: the memory *replaced* (not perturbed) by Gaussian noise with, per sample, the RMS of that sample's as-is
  memory; seeded per (seed, sample index), so it does not depend on the batch size.

plus ``collapse_cosine``: the mean pairwise cosine similarity between the as-is memories of different images, each
memory flattened to one N·H vector (not averaged over slots). Near 1: the memory hardly depends on the image.

**Probes** (`linear_probe`, `leak_probe`, `readability_probes`): an L2-regularised multinomial logistic regression on
per-image features (train images → test images), strength chosen by k-fold cross-validation on the train set only.
Labels come from the SynthMed questions in the data file: lesion presence (the "presence" yes/no question) and the
quadrant of the largest lesion (the "Where is the largest lesion?" multiple-choice question; images with a lesion).
The leak probe asks whether the counterfactual memory M' still carries the label (the intervention leaks evidence);
the readability probes ask how well the label can be read from the VLM's own merged visual tokens (what A_psi reads)
and from the prior encoder's tokens (what P_phi reads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from medsynapse.data.images import load_image
from medsynapse.data.schema import DataError, Sample, read_samples
from medsynapse.data.synthmed import QUADRANTS
from medsynapse.eval.report import write_json
from medsynapse.eval.vqa import evaluate
from medsynapse.locking import write_text_atomic
from medsynapse.model.bases import BaseFolders
from medsynapse.model.medsynapse import MedSynapseV
from medsynapse.model.vlm import core_vlm, vision_features

if TYPE_CHECKING:
    from transformers import Qwen3VLVisionConfig

CONDITIONS = ("as_is", "zeroed", "mean", "shuffled", "counterfactual", "noise")
LABELS = ("presence", "location")
LOCATION_QUESTION = "Where is the largest lesion?"
FEATURES = ("memory", "counterfactual", "vlm_visual_tokens", "prior_tokens", "autonomous_memory")


# --- reliance ---------------------------------------------------------------------------------------------------
def image_key(sample: Sample) -> tuple[str, ...]:
    """What a sample's memory is a function of: its images."""
    return tuple(sample.images)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation p of range(n) with p[i] != i for every i (one seeded cycle through all n); n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    perm = [0] * n
    for j, item in enumerate(order):
        perm[item] = order[(j + 1) % n]
    return perm


def collapse_cosine(memories: torch.Tensor) -> float | None:
    """Mean cosine similarity over pairs of different rows of (K, N, H) memories, each flattened to N·H."""
    if memories.shape[0] < 2:
        return None
    flat = F.normalize(memories.reshape(memories.shape[0], -1).double(), dim=1)
    sims = flat @ flat.T
    upper = torch.triu_indices(len(flat), len(flat), offset=1)
    return float(sims[upper[0], upper[1]].mean())


def has_prior_branch(model: MedSynapseV) -> bool:
    return model.sampler is not None and model.encoder is not None


def reliance_report(model: MedSynapseV, samples: list[Sample], batch_size: int = 16, intervention: str = "zero",
                    seed: int = 0, max_new_tokens: int = 8, conditions: Sequence[str] = CONDITIONS,
                    keep_predictions: bool = False) -> dict:
    """Accuracy under each memory condition (see the module docstring) and the collapse cosine.

    Returns ``{as_is, zeroed, mean, shuffled, counterfactual, noise}`` (accuracy or None), ``collapse_cosine``,
    ``by_question_type`` and ``unparseable`` per condition, ``n``, ``n_images``, ``memory_branch`` and ``skipped``
    (condition → reason for every None). The ``as_is`` pass is plain `evaluate` with an identity hook that records
    the memory, so its answers are exactly those of `evaluate(model, samples)`.
    """
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown reliance condition(s) {sorted(unknown)}; expected some of {CONDITIONS}")
    if model.n_memory == 0:
        raise ValueError("this model has no memory (a plain VLM): there is no memory reliance to measure")
    if not samples:
        raise ValueError("no samples to evaluate")
    keys = [image_key(s) for s in samples]
    bank: dict[tuple[str, ...], torch.Tensor] = {}

    def record(memory: torch.Tensor, indices: list[int]) -> torch.Tensor:
        for row, i in enumerate(indices):
            bank.setdefault(keys[i], memory[row].detach().float().cpu())
        return memory  # the same tensor: the as-is answers are bit-identical to plain evaluate

    results: dict[str, Any] = {}  # evaluate's result dict, or None (skipped)
    skipped: dict[str, str] = {}
    common: dict[str, Any] = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    results["as_is"] = evaluate(model, samples, memory_transform=record, desc="reliance as_is", **common)
    unique = list(bank)
    memories = torch.stack([bank[k] for k in unique])
    mean_memory = memories.mean(0)
    perm = derangement(len(unique), seed) if len(unique) > 1 else None
    partner = {k: unique[perm[j]] for j, k in enumerate(unique)} if perm is not None else {}

    def zeroed(memory, indices):
        return torch.zeros_like(memory)

    def mean(memory, indices):
        return mean_memory.to(memory.device, memory.dtype).expand_as(memory).clone()

    def shuffled(memory, indices):
        return torch.stack([bank[partner[keys[i]]] for i in indices]).to(memory.device, memory.dtype)

    def noise(memory, indices):
        rms = memory.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
        draws = torch.stack([torch.randn(memory.shape[1:], generator=torch.Generator().manual_seed(
            seed * 1_000_003 + i)) for i in indices]).to(memory.device)
        return (draws * rms).to(memory.dtype)

    transforms = {"zeroed": zeroed, "mean": mean, "shuffled": shuffled, "noise": noise}
    for name in CONDITIONS[1:]:
        if name not in conditions:
            results[name] = None
            skipped[name] = "not requested"
        elif name == "shuffled" and perm is None:
            results[name] = None
            skipped[name] = "needs at least 2 different images"
        elif name == "counterfactual":
            if not has_prior_branch(model):
                results[name] = None
                skipped[name] = ("the model has no prior encoder and memory sampler P_phi (an encoder-free student "
                                 "or a plain VLM), so there is no counterfactual memory M'")
            else:
                results[name] = evaluate(model, samples, branch="counterfactual", intervention=intervention,
                                         desc="reliance counterfactual", **common)
        else:
            results[name] = evaluate(model, samples, memory_transform=transforms[name], desc=f"reliance {name}",
                                     **common)
    out: dict = {name: (results[name]["accuracy"] if results[name] is not None else None) for name in CONDITIONS}
    out["collapse_cosine"] = collapse_cosine(memories)
    out["by_question_type"] = {name: (r["by_question_type"] if r is not None else None) for name, r in results.items()}
    out["unparseable"] = {name: (r["unparseable"] if r is not None else None) for name, r in results.items()}
    out["n"] = results["as_is"]["n"]
    out["n_images"] = len(unique)
    out["memory_branch"] = "autonomous" if model.autonomous is not None else "privileged"
    out["intervention"] = intervention
    out["seed"] = seed
    out["skipped"] = skipped
    if keep_predictions:
        out["predictions"] = {name: (r["predictions"] if r is not None else None) for name, r in results.items()}
    return out


# --- linear probes ----------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _standardiser(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features become 0
    return lambda z: (z - mean) / std


@contextmanager
def _single_thread_if_small(x: torch.Tensor) -> Iterator[None]:
    """A probe's ops are tiny; on a busy CPU, thread hand-offs made them ~40x slower than one thread."""
    if x.numel() > 2**22:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _float_type(x: torch.Tensor) -> torch.dtype:
    # float64 while it is cheap; a demo-sized probe (~1,000 x 2,048) fits 2x faster in float32 with the same accuracy
    return torch.float64 if x.numel() <= 2**20 else torch.float32


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, strength: float, n_classes: int | None = None,
              max_iter: int = 200) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit standardisation + L2-regularised multinomial logistic regression (full-batch LBFGS, zero init);
    returns `predict(x) -> class indices`. Labels are class indices 0..C-1.

    Loss = mean cross-entropy + strength / 2 · ||W||² (the bias is not penalised).
    """
    dtype = _float_type(train_x)
    x = train_x.to(dtype)
    standardise = _standardiser(x)
    x = standardise(x)
    y = train_y.long()
    classes = n_classes or int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * strength * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _single_thread_if_small(x):
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda z: (standardise(z.to(dtype)) @ weight + bias).argmax(-1)


def select_strength(train_x: torch.Tensor, train_y: torch.Tensor, strengths: Sequence[float], seed: int = 0,
                    folds: int = 5) -> tuple[float, dict[float, float]]:
    """The strength with the best mean k-fold accuracy on the train set (ties: the stronger regularisation);
    returns it and the cross-validated accuracy of every strength. Only train data is ever seen here."""
    n = len(train_y)
    k = min(folds, n)
    classes = int(train_y.max()) + 1
    if k < 2 or len(set(train_y.tolist())) < 2 or len(strengths) == 1:
        return max(strengths), {}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [order[i::k] for i in range(k)]
    scores: dict[float, float] = {}
    for strength in strengths:
        correct = 0
        for i, held in enumerate(parts):
            fit_index = torch.cat([p for j, p in enumerate(parts) if j != i])
            predict = fit_probe(train_x[fit_index], train_y[fit_index], strength, classes)
            correct += int((predict(train_x[held]) == train_y[held]).sum())
        scores[float(strength)] = correct / n
    best = max(scores.items(), key=lambda item: (item[1], item[0]))[0]
    return best, scores


def linear_probe(train_x: torch.Tensor, train_y: Sequence | torch.Tensor, test_x: torch.Tensor,
                 test_y: Sequence | torch.Tensor, strengths: Sequence[float] = (1e-3, 1e-2, 1e-1),
                 seed: int = 0, folds: int = 3) -> dict:
    """Train on (train_x, train_y), report on the test set.

    Standardised with train statistics; L2-regularised multinomial logistic regression (torch LBFGS, full batch);
    strength chosen by k-fold (k = min(`folds`, n_train)) cross-validation on the train set only. Returns the test
    `accuracy`, its 95 % Wilson interval `ci95`, `chance` (the majority-class rate of the *test* labels),
    `at_chance` (ci95 contains chance), `above_chance` (ci95 entirely above chance: the label can be read; the leak
    probe's test, since a probe below chance reads nothing either), `n_train`, `n_test`, `strength`, `cv_accuracy`
    (per strength) and `n_classes`. A test label never seen in training counts as wrong.
    """
    train_x = torch.as_tensor(train_x).reshape(len(train_x), -1).float()
    test_x = torch.as_tensor(test_x).reshape(len(test_x), -1).float()
    train_list = [v.item() if isinstance(v, torch.Tensor) else v for v in train_y]
    test_list = [v.item() if isinstance(v, torch.Tensor) else v for v in test_y]
    if len(train_list) != len(train_x) or len(test_list) != len(test_x):
        raise ValueError("features and labels differ in length")
    if len(train_list) < 2 or not test_list:
        raise ValueError(f"a probe needs at least 2 training and 1 test example, got {len(train_list)} and "
                         f"{len(test_list)}")
    classes = sorted(set(train_list))
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[v] for v in train_list])
    y_test = torch.tensor([index.get(v, -1) for v in test_list])
    with _single_thread_if_small(train_x):
        strength, cv = select_strength(train_x, y_train, strengths, seed, folds)
        if len(classes) == 1:
            predictions = torch.zeros(len(test_list), dtype=torch.long)
        else:
            predictions = fit_probe(train_x, y_train, strength, len(classes))(test_x)
    correct = int((predictions == y_test).sum())
    n_test = len(test_list)
    low, high = wilson_interval(correct, n_test)
    chance = max(test_list.count(c) for c in set(test_list)) / n_test
    return {"accuracy": correct / n_test, "ci95": [low, high], "chance": chance, "at_chance": low <= chance <= high,
            "above_chance": low > chance,
            "n_train": len(train_list), "n_test": n_test, "strength": strength,
            "cv_accuracy": {str(k): v for k, v in cv.items()}, "n_classes": len(classes)}


# --- labels and features per image ------------------------------------------------------------------------------
@dataclass
class ImageTable:
    """Unique images of a sample file (by first image path) with their SynthMed labels."""

    paths: list[str]
    samples: list[Sample]  # one sample per image (its images, for loading and error messages)
    presence: list[int]  # 1 = at least one lesion
    location: list[int | None]  # quadrant index of the largest lesion (None: no lesion)
    source: str


def image_table(samples: list[Sample], source: str | Path) -> ImageTable:
    """Labels from the SynthMed questions alone: presence from the "presence" yes/no question, the location bin
    from the "Where is the largest lesion?" multiple-choice question (asked exactly when there is a lesion).
    A label that cannot be derived is an error naming `source` and the image."""
    order: list[str] = []
    first: dict[str, Sample] = {}
    presence: dict[str, set[int]] = {}
    location: dict[str, set[int]] = {}
    for s in samples:
        path = s.images[0]
        if path not in first:
            order.append(path)
            first[path] = s
        if s.question_type == "presence" and s.answer_type == "yes_no":
            if s.answer.strip().lower() not in ("yes", "no"):
                raise DataError(f"{source}: record {s.id!r}: presence answer {s.answer!r} is not yes/no")
            presence.setdefault(path, set()).add(int(s.answer.strip().lower() == "yes"))
        if (s.question_type == "location" and s.answer_type == "multiple_choice"
                and s.question.startswith(LOCATION_QUESTION)):
            quadrant = s.options.get(s.answer, "")
            if quadrant not in QUADRANTS:
                raise DataError(f"{source}: record {s.id!r}: location answer {s.answer!r} -> {quadrant!r} is not "
                                f"one of {QUADRANTS}")
            location.setdefault(path, set()).add(QUADRANTS.index(quadrant))
    if not order:
        raise DataError(f"{source}: no samples, so no images to probe")
    present, where = [], []
    for path in order:
        rid = first[path].id
        found = presence.get(path)
        if not found:
            raise DataError(f"{source}: cannot derive the lesion-presence label of image {path} (e.g. record {rid!r}):"
                            " no SynthMed presence question (question_type 'presence', yes/no) about it")
        if len(found) > 1:
            raise DataError(f"{source}: image {path} has contradicting presence answers")
        has_lesion = found.pop()
        quads = location.get(path, set())
        if has_lesion and len(quads) != 1:
            raise DataError(f"{source}: cannot derive the location bin of image {path} (e.g. record {rid!r}): "
                            f"expected one '{LOCATION_QUESTION}' multiple-choice answer, found {len(quads)}")
        if not has_lesion and quads:
            raise DataError(f"{source}: image {path} has no lesion but a largest-lesion location answer")
        present.append(has_lesion)
        where.append(quads.pop() if has_lesion else None)
    return ImageTable(order, [first[p] for p in order], present, where, str(source))


def available_features(model: MedSynapseV) -> list[str]:
    kinds = ["vlm_visual_tokens"]
    if has_prior_branch(model):
        kinds = ["memory", "counterfactual", "vlm_visual_tokens", "prior_tokens"]
    if model.autonomous is not None:
        kinds.append("autonomous_memory")
    return kinds


def _pool_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    if grid == target:
        return tokens
    image = tokens.reshape(*grid, -1).permute(2, 0, 1).unsqueeze(0)
    return F.adaptive_avg_pool2d(image, target).flatten(2).squeeze(0).transpose(0, 1)


@torch.no_grad()
def extract_features(model: MedSynapseV, table: ImageTable, kinds: Sequence[str], intervention: str = "zero",
                     batch_size: int = 16, desc: str = "features") -> dict[str, torch.Tensor]:
    """Per-image features (n_images, D) on the CPU, float32, each flattened:

    - ``memory``: M = P_phi(S), (N·H); ``counterfactual``: M' with `intervention`, (N·H);
    - ``vlm_visual_tokens``: the vision tower's merged visual tokens (`vision_features(...).pooler_output`), (h·w·H);
      images whose token grids differ are average-pooled to the smallest grid first;
    - ``prior_tokens``: the prior encoder's tokens S, (M·d_f);
    - ``autonomous_memory``: A_psi's memory, (N·H).
    """
    unknown = set(kinds) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown feature kind(s) {sorted(unknown)}; expected some of {FEATURES}")
    missing = set(kinds) - set(available_features(model))
    if missing:
        raise ValueError(f"this model cannot give feature(s) {sorted(missing)} (needs "
                         f"{'A_psi' if 'autonomous_memory' in missing else 'the prior encoder and P_phi'})")
    model.eval()
    device = next(core_vlm(model.vlm).parameters()).device
    merge = cast("Qwen3VLVisionConfig", core_vlm(model.vlm).config.vision_config).spatial_merge_size
    out: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    visual: list[tuple[torch.Tensor, tuple[int, int]]] = []
    for start in tqdm(range(0, len(table.paths), batch_size), desc=desc, leave=False):
        rows = range(start, min(start + batch_size, len(table.paths)))
        images: list[Image.Image] = [load_image(table.paths[i], table.samples[i]) for i in rows]
        if {"memory", "counterfactual", "prior_tokens"} & set(kinds):
            prior = model.prior(images)
            if "prior_tokens" in kinds:
                out["prior_tokens"].append(prior.tokens.flatten(1).float().cpu())
            if "memory" in kinds:
                out["memory"].append(model.memory(prior, "privileged").flatten(1).float().cpu())
            if "counterfactual" in kinds:
                if intervention == "pixels":  # the image edited and re-encoded (model/counterfactual.py)
                    counterfactual = model.image_counterfactual_memory(images)
                else:
                    counterfactual = model.memory(prior, "counterfactual", intervention)
                out["counterfactual"].append(counterfactual.flatten(1).float().cpu())
        if {"vlm_visual_tokens", "autonomous_memory"} & set(kinds):
            batch = model.prompts.collate([model.prompts.encode([img], "") for img in images],
                                          with_answers=False).to(device)
            features = vision_features(model.vlm, batch)
            if "vlm_visual_tokens" in kinds:
                grids = [(int(h) // merge, int(w) // merge) for _, h, w in batch.image_grid_thw.tolist()]
                visual += [(t.float().cpu(), g) for t, g in zip(features.pooler_output, grids)]
            if "autonomous_memory" in kinds:
                out["autonomous_memory"].append(model.autonomous_memory(batch, features).flatten(1).float().cpu())
    result = {k: torch.cat(v) for k, v in out.items() if k != "vlm_visual_tokens"}
    if "vlm_visual_tokens" in kinds:
        target = (min(g[0] for _, g in visual), min(g[1] for _, g in visual))
        result["vlm_visual_tokens"] = torch.stack([_pool_grid(t, g, target).flatten() for t, g in visual])
    return result


def _labelled(table: ImageTable, label: str) -> tuple[list[int], list[int]]:
    """(rows, labels) of the images that have `label`."""
    if label == "presence":
        return list(range(len(table.paths))), list(table.presence)
    if label == "location":
        rows = [i for i, q in enumerate(table.location) if q is not None]
        return rows, cast("list[int]", [table.location[i] for i in rows])  # rows: those not None
    raise ValueError(f"unknown probe label {label!r}; expected one of {LABELS}")


def probe_label(train_features: torch.Tensor, train: ImageTable, test_features: torch.Tensor, test: ImageTable,
                label: str, seed: int = 0) -> dict:
    """`linear_probe` for one label; `{"skipped": reason}` when either split has too few labelled images."""
    train_rows, train_y = _labelled(train, label)
    test_rows, test_y = _labelled(test, label)
    if len(train_rows) < 2 or not test_rows:
        return {"skipped": f"{label}: {len(train_rows)} labelled train image(s) in {train.source} and "
                           f"{len(test_rows)} in {test.source} (need at least 2 and 1)"}
    result = linear_probe(train_features[train_rows], train_y, test_features[test_rows], test_y, seed=seed)
    return {"label": label, **result}


def _tables(train_samples, test_samples, train_source, test_source) -> tuple[ImageTable, ImageTable]:
    train = train_samples if isinstance(train_samples, ImageTable) else image_table(train_samples, train_source)
    test = test_samples if isinstance(test_samples, ImageTable) else image_table(test_samples, test_source)
    return train, test


def leak_probe(model: MedSynapseV, train_samples: list[Sample] | ImageTable, test_samples: list[Sample] | ImageTable,
               intervention: str = "zero", label: str = "location", batch_size: int = 16, seed: int = 0,
               train_source: str = "train samples", test_source: str = "test samples",
               labels: Sequence[str] = LABELS, with_memory: bool = True) -> dict:
    """Can the lesion evidence still be read from the counterfactual memory M'? If a probe on M' is well above
    chance, the intervention leaks what it was meant to remove.

    Flat keys for `label` (default: the largest lesion's quadrant, what the region B localises): ``memory`` and
    ``counterfactual`` (test accuracy of a probe on M / on M', None when the label had too few images),
    ``memory_ci95`` / ``counterfactual_ci95``, ``memory_at_chance`` / ``counterfactual_at_chance``,
    ``memory_above_chance`` / ``counterfactual_above_chance`` (M' leaks when its probe is above chance), ``chance``;
    ``by_label``: the full probe results for each of `labels` (presence and location by default; `label` is always
    probed). `with_memory=False` probes M' only (the M keys are then None): for a second intervention on one model.
    """
    if not has_prior_branch(model):
        raise ValueError("the leak probe needs the prior encoder and the memory sampler P_phi (M and M'); this model "
                         "has none (an encoder-free student or a plain VLM)")
    if label not in LABELS:
        raise ValueError(f"unknown probe label {label!r}; expected one of {LABELS}")
    train, test = _tables(train_samples, test_samples, train_source, test_source)
    kinds = ["memory", "counterfactual"] if with_memory else ["counterfactual"]
    train_f = extract_features(model, train, kinds, intervention, batch_size, desc="leak features (train)")
    test_f = extract_features(model, test, kinds, intervention, batch_size, desc="leak features (test)")
    by_label = {name: {k: probe_label(train_f[k], train, test_f[k], test, name, seed) for k in kinds}
                for name in dict.fromkeys([label, *labels])}
    chosen = by_label[label]
    out: dict = {"label": label, "intervention": intervention}
    for k in ("memory", "counterfactual"):
        out[k] = chosen[k].get("accuracy") if k in kinds else None
        out[f"{k}_ci95"] = chosen[k].get("ci95") if k in kinds else None
        out[f"{k}_at_chance"] = chosen[k].get("at_chance") if k in kinds else None
        out[f"{k}_above_chance"] = chosen[k].get("above_chance") if k in kinds else None
    out["chance"] = chosen["counterfactual"].get("chance")
    out["by_label"] = by_label
    return out


def readability_probes(model: MedSynapseV, train_samples: list[Sample] | ImageTable,
                       test_samples: list[Sample] | ImageTable, label: str = "presence", batch_size: int = 16,
                       seed: int = 0, train_source: str = "train samples", test_source: str = "test samples",
                       labels: Sequence[str] = LABELS, kinds: Sequence[str] | None = None) -> dict:
    """How well the lesion labels can be read linearly from the VLM's merged visual tokens (what A_psi reads), the
    prior encoder's tokens (only with an encoder) and A_psi's memory (only for a model with A_psi).

    ``{source: probe result for `label` + {"by_label": {"presence": ..., "location": ...}}}`` for each of `labels`
    (`label` always); `kinds`: the sources to probe (None: every one the model has).
    """
    if label not in LABELS:
        raise ValueError(f"unknown probe label {label!r}; expected one of {LABELS}")
    train, test = _tables(train_samples, test_samples, train_source, test_source)
    kinds = [k for k in (kinds or ("vlm_visual_tokens", "prior_tokens", "autonomous_memory"))
             if k in available_features(model)]
    train_f = extract_features(model, train, kinds, batch_size=batch_size, desc="readability features (train)")
    test_f = extract_features(model, test, kinds, batch_size=batch_size, desc="readability features (test)")
    out = {}
    for k in kinds:
        by_label = {name: probe_label(train_f[k], train, test_f[k], test, name, seed)
                    for name in dict.fromkeys([label, *labels])}
        out[k] = {**by_label[label], "by_label": by_label}
    return out


# --- the report -------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown_report(result: dict) -> str:
    rel = result["reliance"]
    lines = [f"# Memory diagnostics: {result['model']}", "",
             f"{rel['n']} questions on {rel['n_images']} images of {result['data']} (memory: {rel['memory_branch']}; "
             f"counterfactual intervention: {rel['intervention']}).", "",
             "## Reliance", "", "| memory | accuracy | Δ vs as is |", "|---|---|---|"]
    for name in CONDITIONS:
        acc = rel[name]
        delta = f"{acc - rel['as_is']:+.3f}" if acc is not None else "—"
        lines.append(f"| {name} | {_fmt(acc)} | {delta} |")
    types = sorted({t for v in rel["by_question_type"].values() if v for t in v})
    if types:
        shown = [c for c in CONDITIONS if rel["by_question_type"].get(c)]
        lines += ["", "| question type | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for t in types:
            cells = [_fmt(rel["by_question_type"][c].get(t, {}).get("accuracy")) for c in shown]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Collapse (mean pairwise cosine of flattened memories across images): "
                  + ("—" if rel["collapse_cosine"] is None else f"{rel['collapse_cosine']:.4f}")]
    probes = result["probes"]
    lines += ["", "## Linear probes (train images → test images)", ""]
    if "skipped" in probes:
        lines.append(f"Skipped: {probes['skipped']}")
    else:
        lines += ["| features | label | accuracy | 95 % CI | chance | at chance | n train / test |",
                  "|---|---|---|---|---|---|---|"]
        rows = [(f"leak: {k}", label, r) for label, per in probes.get("leak", {}).get("by_label", {}).items()
                for k, r in per.items()]
        rows += [(k, label, r) for k, per in probes.get("readability", {}).items()
                 for label, r in per["by_label"].items()]
        for name, label, r in rows:
            if "skipped" in r:
                lines.append(f"| {name} | {label} | skipped: {r['skipped']} | | | | |")
            else:
                lo, hi = r["ci95"]
                lines.append(f"| {name} | {label} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['chance']:.3f} "
                             f"| {'yes' if r['at_chance'] else 'no'} | {r['n_train']} / {r['n_test']} |")
    if result["skipped"]:
        lines += ["", f"## Skipped ({result['n_skipped']})", ""]
        lines += [f"- {item['what']}: {item['reason']}" for item in result["skipped"]]
    return "\n".join(lines) + "\n"


def diagnose(model_dir: str | Path, data_file: str | Path, train_file: str | Path | None = None,
             output: str | Path | None = None, batch_size: int = 16, families: Sequence[str] | None = None,
             intervention: str = "zero", seed: int = 0, max_new_tokens: int = 8,
             conditions: Sequence[str] = CONDITIONS, model: MedSynapseV | None = None,
             bases: BaseFolders | None = None) -> dict:
    """The memory-reliance report of a saved model on a sample file; probes too when `train_file` is given.

    Reliance runs on the questions of `families` (None: all), captions excluded (free text is not scored); probes
    use every image of the files. Writes OUT/diagnostics.json and OUT/diagnostics.md when `output` is given.
    `conditions`: the reliance conditions to run (the others are None, listed as skipped); `model`: an already
    loaded model (then `model_dir` is only recorded).
    """
    data_file = Path(data_file)
    samples = read_samples(data_file)
    scored = [s for s in samples if s.answer_type != "caption" and (not families or s.family in families)]
    if not scored:
        raise DataError(f"{data_file}: no scorable (non-caption) questions"
                        + (f" of families {list(families)}" if families else ""))
    tables = None
    if train_file is not None:  # labels first: a file they cannot come from fails before any generation
        tables = image_table(read_samples(train_file), train_file), image_table(samples, data_file)
    if model is None:
        model = MedSynapseV.from_pretrained(model_dir, merge_adapter=True, bases=bases)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    skipped: list[dict] = []
    print(f"reliance: {len(scored)} questions, conditions {', '.join(conditions)}", flush=True)
    reliance = reliance_report(model, scored, batch_size, intervention, seed, max_new_tokens, conditions)
    skipped += [{"what": f"reliance.{name}", "reason": reason} for name, reason in reliance["skipped"].items()]
    probes: dict
    if tables is None:
        reason = "no train file (--train-data): the leak and readability probes need train images to fit on"
        probes = {"skipped": reason}
        skipped.append({"what": "probes", "reason": reason})
    else:
        print("probes: labels from the SynthMed questions, features per image", flush=True)
        train_table, test_table = tables
        probes = {}
        if has_prior_branch(model):
            probes["leak"] = leak_probe(model, train_table, test_table, intervention, batch_size=batch_size,
                                        seed=seed)
        else:
            skipped.append({"what": "probes.leak", "reason": "no prior encoder and P_phi: no M' to probe"})
        probes["readability"] = readability_probes(model, train_table, test_table, batch_size=batch_size, seed=seed)
        if "prior_tokens" not in probes["readability"]:
            skipped.append({"what": "probes.readability.prior_tokens", "reason": "the model has no prior encoder"})
        for source, per in [*((f"leak.{k}", v) for k, v in probes.get("leak", {}).get("by_label", {}).items()),
                            *((f"readability.{k}", v["by_label"]) for k, v in probes["readability"].items())]:
            skipped += [{"what": f"probes.{source}.{label}", "reason": r["skipped"]}
                        for label, r in per.items() if "skipped" in r]
    result = {"model": str(model_dir), "data": str(data_file),
              "train_data": str(train_file) if train_file is not None else None,
              "settings": {"batch_size": batch_size, "families": list(families) if families else None,
                           "intervention": intervention, "seed": seed, "max_new_tokens": max_new_tokens},
              "reliance": reliance, "probes": probes, "skipped": skipped, "n_skipped": len(skipped)}
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "diagnostics.json", result)
        write_text_atomic(output / "diagnostics.md", markdown_report(result))
    return result
