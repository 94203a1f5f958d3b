"""SAM / MedSAM prior encoder from a transformers SamModel folder (tiny random config)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medsynapse.model.encoders import load_encoder
from medsynapse.model.encoders.sam import SamPriorEncoder


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1],
                                      mlp_dim=64, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_attention_heads=2,
                                                 iou_head_hidden_dim=16))
    folder = tmp_path_factory.mktemp("sam")
    SamModel(config).save_pretrained(folder)
    return folder


def test_sam_folder_loads_through_load_encoder_and_encodes(sam_folder):
    encoder = load_encoder(sam_folder)
    assert isinstance(encoder, SamPriorEncoder)
    images = [Image.new("RGB", (80, 60), (i * 60, 30, 90)) for i in range(3)]
    out = encoder.encode(images)
    assert out.grid == (4, 4)
    assert out.tokens.shape == (3, 16, 16) and encoder.feature_dim == 16
    assert out.region_mask.shape == (3, 16) and out.region_mask.dtype == torch.bool
    assert out.region_mask.any(dim=1).all()
    assert not out.tokens.requires_grad


def test_region_follows_the_best_scoring_mask(sam_folder, monkeypatch):
    encoder = load_encoder(sam_folder)
    pixels = encoder.preprocess([Image.new("RGB", (64, 64))])
    real_forward = encoder.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        masks = torch.full_like(out.pred_masks, -20.0)
        masks[:, 0, 2, :4, :4] = 20.0  # candidate 2: the top-left corner of the low-res mask
        out.pred_masks = masks
        out.iou_scores = torch.tensor([[[0.1, 0.2, 0.9]]])
        return out

    monkeypatch.setattr(encoder.model, "forward", forward)
    region = encoder.encode_pixels(pixels).region_mask[0].view(4, 4)
    assert region[0, 0] and region.sum() == 1


def test_stage1_runs_with_a_sam_encoder(tiny_env, sam_folder, tmp_path):
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1

    out = train_stage1(Stage1Config(vlm=str(tiny_env.vlm), encoder=str(sam_folder), train_file=str(tiny_env.train_file),
                                    output_dir=str(tmp_path / "s1"), n_memory=4, sampler_width=32, batch_size=4,
                                    max_steps=2))
    model = MedSynapseV.from_pretrained(out)
    assert isinstance(model.encoder, SamPriorEncoder) and model.sampler.config.prior_dim == 16
