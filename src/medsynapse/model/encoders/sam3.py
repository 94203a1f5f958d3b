"""SAM 3 / MedSAM3 as the prior encoder, from a transformers `Sam3Model` folder (text-prompted concept segmentation).

Prior tokens: one level of the vision encoder (`Sam3Model.get_vision_features`), chosen by `feature_level`:

| `feature_level` | source | grid at 1008 px | channels |
| --- | --- | --- | --- |
| `"fpn_1x"` (default) | FPN level at scale 1 (stride 14) | 72 x 72 | `fpn_hidden_size` (256) |
| `"fpn_2x"`, `"fpn_4x"`, `"fpn_0.5x"` | the other FPN levels (`vision_config.scale_factors`) | 144², 288², 36² | 256 |
| `"vit"` | ViT `last_hidden_state` (before the neck) | 72 x 72 | ViT hidden size (1024) |

Why `fpn_1x`: it is the level SAM 3's own DETR encoder reads (the detector works on `fpn_hidden_states[:-1][-1]`),
so the prompt-conditioned detection that yields the region mask is computed from exactly these tokens; it has the
same 256 channels as the SAM/MedSAM neck tokens (a drop-in `prior_dim`), and 5,184 tokens at 1008 px, close to
SAM's 4,096. The ViT level is 4x wider per token for the same grid; the 2x/4x levels multiply the token count.

Region mask: each text prompt (default `("lesion", "tumor", "nodule")`) runs the detector on the vision features
computed once per batch (`Sam3Model(vision_embeds=..., input_ids=...)`). Each query is scored
`sigmoid(pred_logits) * sigmoid(presence_logits)` (the presence token says whether the concept is in the image at
all, so it must weigh prompts against each other); the highest-scoring query over all prompts and queries gives the
mask, whose probability, max-pooled onto the token grid, is each token's confidence, and `top_region` the mask.

Settings (prompts, threshold, feature level) live in `medsynapse_sam3.json` inside the model folder, so they are part
of the folder and of the feature-cache fingerprint (`encoder_settings` also hashes the resolved defaults).
Preprocessing mirrors `Sam3ImageProcessor` without torchvision: square resize to the model size (bilinear), rescale
1/255, normalise with mean = std = 0.5; values come from the folder's preprocessor config when present.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medsynapse.model.encoders.base import PriorEncoder, PriorOutput, has_finding, top_region

if TYPE_CHECKING:
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig

SETTINGS_FILE = "medsynapse_sam3.json"
DEFAULT_PROMPTS: tuple[str, ...] = ("lesion", "tumor", "nodule")
DEFAULT_FEATURE_LEVEL = "fpn_1x"
DEFAULT_THRESHOLD = 0.5
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Sam3Settings:
    """What the encoder computes beyond its weights; every field feeds the feature-cache fingerprint."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    threshold: float = DEFAULT_THRESHOLD
    feature_level: str = DEFAULT_FEATURE_LEVEL

    @classmethod
    def load(cls, folder: str | Path, **overrides: Any) -> Sam3Settings:
        """Code defaults, then the folder's settings file, then explicit overrides."""
        path = Path(folder).expanduser() / SETTINGS_FILE
        values: dict[str, Any] = {"prompts": DEFAULT_PROMPTS, "threshold": DEFAULT_THRESHOLD,
                                  "feature_level": DEFAULT_FEATURE_LEVEL}
        if path.is_file():
            values.update(json.loads(path.read_text()))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SAM 3 encoder settings {sorted(unknown)} (from {path} or arguments)")
        prompts = (values["prompts"],) if isinstance(values["prompts"], str) else tuple(values["prompts"])
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{path}: prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        return cls(prompts, float(values["threshold"]), str(values["feature_level"]))

    def save(self, folder: str | Path) -> None:
        (Path(folder).expanduser() / SETTINGS_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": list(self.prompts)}


@dataclass(frozen=True)
class Sam3Preprocess:
    """`Sam3ImageProcessor` on PIL: square resize, rescale, normalise, (B, 3, H, W) float32."""

    size: tuple[int, int]  # (height, width)
    resample: int = Image.Resampling.BILINEAR
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: Path, model_size: tuple[int, int]) -> Sam3Preprocess:
        """Read the folder's (pre)processor config as plain json; without one, the model's input size and defaults."""
        config = _image_processor_config(folder)
        if config is None:
            return cls(model_size)
        size = config.get("size") or {}
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        else:
            side = size.get("longest_edge") or size.get("shortest_edge")
            hw = (int(side), int(side)) if side else model_size
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        normalize = config.get("do_normalize", True)
        mean = tuple(config.get("image_mean", (0.5,) * 3)) if normalize else (0.0,) * 3
        std = tuple(config.get("image_std", (0.5,) * 3)) if normalize else (1.0,) * 3
        resample = config.get("resample")
        return cls(hw, Image.Resampling.BILINEAR if resample is None else int(resample), rescale, mean, std)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        height, width = self.size
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = []
        for image in images:
            resized = image.convert("RGB").resize((width, height), resample=self.resample)
            # rescale in float64, normalise in float32: transformers' PIL pipeline, to the last bit
            pixels = (np.asarray(resized, dtype=np.float64) * self.rescale_factor).astype(np.float32)
            arrays.append((pixels - mean) / std)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _image_processor_config(folder: Path) -> dict[str, Any] | None:
    """transformers 4 writes preprocessor_config.json; 5 may nest it under processor_config.json's image_processor."""
    legacy = folder / "preprocessor_config.json"
    if legacy.is_file():
        return json.loads(legacy.read_text())
    combined = folder / "processor_config.json"
    if combined.is_file():
        return json.loads(combined.read_text()).get("image_processor")
    return None


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resolve_level(vision_config: Any, level: str) -> int | None:
    """None for the ViT output, else the index into `fpn_hidden_states` (`fpn_<scale>x`, from `scale_factors`)."""
    names = {f"fpn_{float(s):g}x": i for i, s in enumerate(vision_config.scale_factors)}
    if level == "vit":
        return None
    if level not in names:
        raise ValueError(f"unknown SAM 3 feature_level {level!r}; choose one of {['vit', *names]}")
    return names[level]


def level_channels(vision_config: Any, level: str) -> int:
    """Channels of the prior tokens at `level` (the sampler's `prior_dim`): the ViT hidden size (1024 in SAM 3) for
    `vit`, `fpn_hidden_size` (256) for every FPN level. `medsynapse inspect` counts P_phi with the same function."""
    if resolve_level(vision_config, level) is None:
        return int(vision_config.backbone_config.hidden_size)
    return int(vision_config.fpn_hidden_size)


def query_scores(out: Any) -> torch.Tensor:
    """Per-query confidence (B, Q): sigmoid(pred_logits), times sigmoid(presence_logits) when the model returns it."""
    scores = torch.sigmoid(out.pred_logits.float())
    if getattr(out, "presence_logits", None) is not None:
        scores = scores * torch.sigmoid(out.presence_logits.float())
    return scores


class Sam3PriorEncoder(PriorEncoder):
    """Frozen SAM 3 (or merged MedSAM3): vision tokens at `feature_level`, region from text-prompted detection."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: Sam3Preprocess, settings: Sam3Settings | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess_fn = preprocess
        self.settings = settings or Sam3Settings()
        self.threshold = self.settings.threshold
        self.prompts = self.settings.prompts
        self._level = resolve_level(model.config.vision_config, self.settings.feature_level)
        self.feature_dim = level_channels(model.config.vision_config, self.settings.feature_level)
        context = model.config.text_config.max_position_embeddings
        self._prompt_inputs = [tokenizer(p, padding="max_length", max_length=context, truncation=True,
                                         return_tensors="pt") for p in self.prompts]

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> Sam3PriorEncoder:
        """kwargs (prompts, threshold, feature_level) override the folder's settings file; cache those in the file."""
        from transformers import AutoTokenizer, Sam3Model

        folder = Path(folder).expanduser()
        settings = Sam3Settings.load(folder, **kwargs)
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); the SAM 3 prior "
                                    "encoder needs the CLIP tokenizer saved next to the weights for its text prompts")
        model = Sam3Model.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        backbone = cast("Sam3ViTConfig", cast("Sam3VisionConfig", model.config.vision_config).backbone_config)
        preprocess = Sam3Preprocess.from_folder(folder, _pair(backbone.image_size))
        patch = _pair(backbone.patch_size)
        if preprocess.size[0] % patch[0] or preprocess.size[1] % patch[1]:
            raise ValueError(f"{folder}: input size {preprocess.size} is not a multiple of the patch size {patch}")
        return cls(model, tokenizer, preprocess, settings)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.preprocess_fn(images)

    def encode_pixels(self, pixels: torch.Tensor) -> PriorOutput:
        pixels = pixels.to(self.model.dtype)
        vision = self.model.get_vision_features(pixel_values=pixels)
        tokens, grid = self._tokens(vision, pixels)
        confidence = self.token_confidence(vision, grid)
        region = top_region(confidence, self.threshold)
        return PriorOutput(tokens, grid, region, has_finding(confidence, self.threshold))

    def _tokens(self, vision: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self._level is None:
            patch = _pair(self.model.config.vision_config.backbone_config.patch_size)
            grid = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
            return vision.last_hidden_state, grid
        features = vision.fpn_hidden_states[self._level]  # (B, C, Hf, Wf)
        return features.flatten(2).transpose(1, 2), (features.shape[-2], features.shape[-1])

    def token_confidence(self, vision: Any, grid: tuple[int, int]) -> torch.Tensor:
        """Per-token confidence (B, Hf*Wf): the best query's mask probability, max-pooled onto the grid."""
        masks = torch.sigmoid(self.best_query_masks(vision).float())
        return F.adaptive_max_pool2d(masks.unsqueeze(1), grid).flatten(1)

    def best_query_masks(self, vision: Any) -> torch.Tensor:
        """Mask logits (B, h, w) of the highest-scoring query over all prompts; the vision features are reused."""
        batch = vision.fpn_hidden_states[0].shape[0]
        device = vision.fpn_hidden_states[0].device
        best_score = torch.full((batch,), -1.0, device=device)
        best_mask = None
        for inputs in self._prompt_inputs:
            ids = inputs["input_ids"].to(device).expand(batch, -1)
            attention = inputs["attention_mask"].to(device).expand(batch, -1)
            out = self.model(vision_embeds=vision, input_ids=ids, attention_mask=attention)
            score, query = query_scores(out).max(dim=1)  # first index on ties, like argmax over (prompt, query)
            mask = out.pred_masks[torch.arange(batch, device=device), query]
            if best_mask is None:
                best_mask = mask
            better = score > best_score
            best_mask = torch.where(better[:, None, None], mask, best_mask)
            best_score = torch.where(better, score, best_score)
        return cast(torch.Tensor, best_mask)  # set by the first prompt (the settings hold at least one)
