"""Prior encoders behind one interface; `load_encoder` picks the class from the folder's config."""

from __future__ import annotations

import json
from pathlib import Path

from medsynapse.model.encoders.base import PriorEncoder, PriorOutput, has_finding, top_region
from medsynapse.model.encoders.tiny_seg import TinySegConfig, TinySegEncoder

__all__ = ["PriorEncoder", "PriorOutput", "TinySegConfig", "TinySegEncoder", "encoder_settings", "has_finding",
           "load_encoder", "top_region"]


def _read_config(folder: str | Path) -> tuple[Path, dict]:
    config_path = Path(folder).expanduser() / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not a prior-encoder folder (no config.json)")
    return config_path, json.loads(config_path.read_text())


def encoder_settings(folder: str | Path) -> dict:
    """Settings an encoder resolves beyond its folder's files (e.g. code defaults for SAM 3 prompts); {} for none.

    Part of the feature-cache fingerprint, so changing a default in code also invalidates cached features.
    """
    config_path = Path(folder).expanduser() / "config.json"
    if not config_path.is_file():
        return {}
    if json.loads(config_path.read_text()).get("model_type") == "sam3":
        from medsynapse.model.encoders.sam3 import Sam3Settings

        return {"sam3": Sam3Settings.load(folder).to_json()}
    return {}


def load_encoder(folder: str | Path) -> PriorEncoder:
    config_path, config = _read_config(folder)
    if config.get("encoder") == "tiny_seg":
        return TinySegEncoder.from_pretrained(config_path.parent)
    if config.get("model_type") == "sam":  # a transformers SamModel folder (SAM, MedSAM)
        from medsynapse.model.encoders.sam import SamPriorEncoder

        return SamPriorEncoder.from_pretrained(config_path.parent)
    if config.get("model_type") == "sam3":  # a transformers Sam3Model folder (SAM 3, MedSAM3 merged)
        from medsynapse.model.encoders.sam3 import Sam3PriorEncoder

        return Sam3PriorEncoder.from_pretrained(config_path.parent)
    kind = config.get("encoder", config.get("model_type"))
    raise ValueError(f"{config_path}: unknown encoder type {kind!r} "
                     "(known: tiny_seg, a transformers SamModel or Sam3Model folder)")
