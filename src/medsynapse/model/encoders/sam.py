"""SAM / MedSAM as the prior encoder, from a transformers `SamModel` folder (e.g. a MedSAM ViT-B checkpoint).

Prior tokens: the image encoder's neck output (256 channels on a 64 x 64 grid at 1024 px), flattened. Region mask: the
mask decoder, prompted with a box (the whole image by default, configurable), returns 3 candidate masks with
predicted IoU; the highest-scoring mask's probability, max-pooled onto the token grid, gives each token's confidence
and `top_region` the mask (>= threshold, else the single most confident token). Preprocessing is transformers' PIL
processor (no torchvision needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from PIL import Image

from medsynapse.model.encoders.base import PriorEncoder, PriorOutput, has_finding, top_region

if TYPE_CHECKING:
    from transformers import SamVisionConfig


class SamPriorEncoder(PriorEncoder):
    def __init__(self, model, processor, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
                 threshold: float = 0.5):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.box = box  # fractions of the (resized) image: x0, y0, x1, y1
        self.threshold = threshold
        self.feature_dim = model.config.vision_config.output_channels

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> SamPriorEncoder:
        from transformers import SamModel
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        folder = Path(folder).expanduser()
        model = SamModel.from_pretrained(folder, use_safetensors=True)
        try:
            processor = SamImageProcessorPil.from_pretrained(folder)
        except OSError:  # a weights-only folder: the processor that matches the model's input size
            side = cast(int, cast("SamVisionConfig", model.config.vision_config).image_size)  # SAM's: one int
            processor = SamImageProcessorPil(size={"longest_edge": side}, pad_size={"height": side, "width": side})
        return cls(model, processor, **kwargs)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]

    def encode_pixels(self, pixels: torch.Tensor) -> PriorOutput:
        embeddings = self.model.get_image_embeddings(pixels)  # (B, C, Hf, Wf)
        batch, _, height, width = embeddings.shape
        side = pixels.shape[-1]
        x0, y0, x1, y1 = (v * side for v in self.box)
        boxes = torch.tensor([[[x0, y0, x1, y1]]], dtype=pixels.dtype, device=pixels.device).expand(batch, 1, 4)
        out = self.model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=True)
        best = out.iou_scores[:, 0].argmax(dim=-1)  # (B,)
        masks = out.pred_masks[:, 0][torch.arange(batch), best]  # (B, h, w) logits
        confidence = F.adaptive_max_pool2d(torch.sigmoid(masks).unsqueeze(1).float(), (height, width)).flatten(1)
        tokens = embeddings.flatten(2).transpose(1, 2)
        return PriorOutput(tokens, (height, width), top_region(confidence, self.threshold),
                           has_finding(confidence, self.threshold))
