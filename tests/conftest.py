"""Shared tiny fixtures: a random-weight tiny Qwen3-VL, a small SynthMed split and a random prior encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> TinyEnv:
    from transformers.utils import logging

    from medsynapse.data.synthmed import corpus_lines, generate_split
    from medsynapse.model.encoders import TinySegEncoder
    from medsynapse.model.tiny import build_tiny_vlm

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("tiny")
    vlm = build_tiny_vlm(root / "vlm", corpus_lines())
    torch.manual_seed(0)
    encoder = TinySegEncoder().eval()
    encoder.save_pretrained(root / "encoder")
    train = generate_split(root / "data", "train", 12, seed=0)
    test = generate_split(root / "data", "test", 4, seed=0)
    return TinyEnv(root, vlm, root / "encoder", train, test)


@pytest.fixture()
def model(tiny_env):
    from medsynapse.model.medsynapse import MedSynapseV

    torch.manual_seed(0)
    return MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
