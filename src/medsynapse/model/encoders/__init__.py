"""Prior encoders behind one interface; `load_encoder` picks the class from the folder's config."""

from __future__ import annotations

import json
from pathlib import Path

from medsynapse.model.encoders.base import PriorEncoder, PriorOutput, top_region
from medsynapse.model.encoders.tiny_seg import TinySegConfig, TinySegEncoder

__all__ = ["PriorEncoder", "PriorOutput", "TinySegConfig", "TinySegEncoder", "load_encoder", "top_region"]


def load_encoder(folder: str | Path) -> PriorEncoder:
    config_path = Path(folder).expanduser() / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not a prior-encoder folder (no config.json)")
    kind = json.loads(config_path.read_text()).get("encoder")
    if kind == "tiny_seg":
        return TinySegEncoder.from_pretrained(config_path.parent)
    raise ValueError(f"{config_path}: unknown encoder type {kind!r} (known: 'tiny_seg')")
