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
    config = json.loads(config_path.read_text())
    if config.get("encoder") == "tiny_seg":
        return TinySegEncoder.from_pretrained(config_path.parent)
    if config.get("model_type") == "sam":  # a transformers SamModel folder (SAM, MedSAM)
        from medsynapse.model.encoders.sam import SamPriorEncoder

        return SamPriorEncoder.from_pretrained(config_path.parent)
    kind = config.get("encoder", config.get("model_type"))
    raise ValueError(f"{config_path}: unknown encoder type {kind!r} (known: tiny_seg, a transformers SamModel folder)")
