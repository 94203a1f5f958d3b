"""Shared tiny fixtures: a random-weight tiny Qwen3-VL, a small SynthMed split and a random prior encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs two workers) each worker keeps to one thread, so two workers share two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

# `make mutation` runs the selected tests once per mutant: property tests draw fewer examples there (the normal suite
# keeps its counts). MEDSYNAPSE_MUTATION is set by the Makefile target only.
MUTATION_RUN = bool(os.environ.get("MEDSYNAPSE_MUTATION"))
settings.register_profile("mutation", max_examples=25, deadline=None, database=None)
if MUTATION_RUN:
    settings.load_profile("mutation")


def examples(count: int) -> int:
    """`count` property-test examples, or 25 under mutation testing."""
    return min(count, 25) if MUTATION_RUN else count


def pytest_collection_modifyitems(config, items) -> None:
    """The torchrun tests share fixed rendezvous ports and one session-wide Stage I (`distributed_stage1`): under
    pytest-xdist's `--dist loadgroup` they all run in one worker, one after another."""
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.xdist_group("torchrun"))


class Interrupted(RuntimeError):
    """Raised from a recipe's `on_step` hook to simulate a kill after that step (its checkpoint may not exist)."""


def crash_at(step_to_crash: int):
    def on_step(step: int) -> None:
        if step == step_to_crash:
            raise Interrupted

    return on_step


@dataclass
class TinyEnv:
    root: Path
    vlm: Path
    encoder: Path
    train_file: Path
    test_file: Path


def build_tiny_env(root: Path) -> TinyEnv:
    from transformers.utils import logging

    from medsynapse.data.synthmed import corpus_lines, generate_split
    from medsynapse.model.encoders import TinySegEncoder
    from medsynapse.model.tiny import build_tiny_vlm

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    vlm = build_tiny_vlm(root / "vlm", corpus_lines())
    torch.manual_seed(0)
    encoder = TinySegEncoder().eval()
    encoder.save_pretrained(root / "encoder")
    train = generate_split(root / "data", "train", 12, seed=0)
    test = generate_split(root / "data", "test", 4, seed=0)
    return TinyEnv(root, vlm, root / "encoder", train, test)


def mutation_tiny_env(tmp_path_factory) -> TinyEnv:
    """Under `make mutation` every mutant starts a test session: build the (deterministic) tiny environment once into
    a shared folder, renamed into place when complete, and give each session a private copy of it."""
    import shutil
    import tempfile

    shared = Path(tempfile.gettempdir()) / f"medsynapse-mutation-tiny-{os.getuid()}"
    if not (shared / "vlm" / "config.json").is_file():
        staging = Path(tempfile.mkdtemp(dir=shared.parent, prefix=shared.name + ".building."))
        build_tiny_env(staging)
        try:
            staging.rename(shared)
        except OSError:  # another session finished first: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    root = tmp_path_factory.mktemp("tiny")
    shutil.copytree(shared, root, dirs_exist_ok=True)
    return TinyEnv(root, root / "vlm", root / "encoder", root / "data" / "train.jsonl", root / "data" / "test.jsonl")


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> TinyEnv:
    if MUTATION_RUN:
        return mutation_tiny_env(tmp_path_factory)
    return build_tiny_env(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def model(tiny_env):
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    return MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")


def stage1_config(tiny_env: TinyEnv, out, **overrides):
    """A tiny Stage I config on the shared environment (4 memory slots, width 32), with overrides."""
    from medsynapse.recipes.stage1_warmup import Stage1Config

    base = dict(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                output_dir=str(out), n_memory=4, sampler_width=32, batch_size=4, max_steps=6, save_every=2,
                lr=1e-3, log_every=1, answer_types=["yes_no", "multiple_choice", "open"])
    return Stage1Config(**{**base, **overrides})


@pytest.fixture(scope="module")
def stage2_dir(tiny_env, tmp_path_factory):
    """A tiny Stage II folder (from a 2-step Stage I; 4 memory slots, LoRA r 4), once per test module."""
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2

    s1 = tmp_path_factory.mktemp("s1")
    train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(tiny_env.train_file),
                              output_dir=str(s1), n_memory=4, sampler_width=32, batch_size=4, max_steps=2))
    s2 = tmp_path_factory.mktemp("s2")
    train_stage2(Stage2Config(model=str(s1), train_file=str(tiny_env.train_file), output_dir=str(s2), lora_r=4,
                              lora_alpha=8, group_size=2, batch_size=2, max_steps=2, max_new_tokens=3))
    return s2


def run_file(path, section: str, values: dict | str) -> Path:
    """A run file at `path` whose `section` (stage1, stage2, stage3, or a baseline method: its `baselines` entry)
    holds `values` (a mapping, or YAML lines of the recipe's own keys); the run's output beside it. A key the section
    sets wins over what the model and data sections fill in, so the recipe gets these values as they are."""
    import yaml

    from medsynapse.recipes.registry import STAGES

    values = yaml.safe_load(values) if isinstance(values, str) else dict(values)
    path = Path(path)
    placed = {section: values} if section in STAGES else {"baselines": {section: values}}
    path.write_text(yaml.safe_dump({"output": str(path.with_name(path.stem + "-run")), **placed}, sort_keys=False))
    return path


def lora_teacher(tiny_env: TinyEnv, folder, max_images: int | None = None):
    """A teacher (4 memory slots, width 32) with a LoRA on q and v whose B matrices are non-zero (a fresh LoRA is the
    identity), saved as Stage II saves it; returns `folder`."""
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    extra = {"max_images": max_images} if max_images else {}
    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32", **extra)
    model.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(folder)
    return folder


def write_dicom(path, pixels, photometric="MONOCHROME2", window=None, slope=1.0, intercept=0.0) -> None:
    """An uncompressed DICOM: a signed 16-bit grey slice (with rescale and window), or (H, W, 3) unsigned 16-bit RGB."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, photometric)
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0 if colour else 1
    if not colour:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16 if colour else np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="session")
def distributed_stage1(tiny_env, tmp_path_factory) -> Path:
    """One Stage I folder (test_distributed's settings, trained by one process) that the DDP and FSDP2 Stage II/III
    tests start from, read-only: trained once per session instead of once per test."""
    from test_distributed import _config, _probe

    out = tmp_path_factory.mktemp("distributed_stage1") / "s1"
    _probe(["train", "stage1", "--config", str(_config(tiny_env, out))], out.parent / "probe-s1")
    return out
