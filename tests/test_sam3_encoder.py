"""SAM 3 / MedSAM3 prior encoder and the MedSAM3 LoRA merge, on a tiny random transformers Sam3Model (328 k params)."""

from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medsynapse.model.encoders import encoder_settings, load_encoder, top_region
from medsynapse.model.encoders import sam3 as sam3_module
from medsynapse.model.encoders.cache import encoder_fingerprint
from medsynapse.model.encoders.medsam3_convert import LoraMappingError, main, merge_medsam3_lora
from medsynapse.model.encoders.sam3 import SETTINGS_FILE, Sam3Preprocess, Sam3PriorEncoder, Sam3Settings

SIDE = 56  # 4 x 4 ViT patches of 14 px; FPN levels 16², 8², 4², 2²; masks 16²
VIT, FPN, TEXT = 64, 32, 32  # hidden sizes (distinct so a wrong level shows in the shapes)


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory):
    from transformers import CLIPTokenizer, Sam3Config, Sam3Model, Sam3VisionConfig, Sam3ViTConfig

    torch.manual_seed(0)
    vit = Sam3ViTConfig(hidden_size=VIT, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=SIDE, patch_size=14, window_size=2, global_attn_indexes=[1],
                        pretrain_image_size=SIDE)
    vision = Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=FPN,
                              backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]])
    text = dict(vocab_size=64, hidden_size=TEXT, intermediate_size=64, projection_dim=TEXT, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    small = dict(hidden_size=FPN, num_attention_heads=4, intermediate_size=64)
    config = Sam3Config(vision_config=vision, text_config=text, geometry_encoder_config=dict(num_layers=1, **small),
                        detr_encoder_config=dict(num_layers=1, **small),
                        detr_decoder_config=dict(num_layers=1, num_queries=5, **small),
                        mask_decoder_config=dict(hidden_size=FPN, num_attention_heads=4))
    folder = tmp_path_factory.mktemp("sam3")
    Sam3Model(config).save_pretrained(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # CLIP-style BPE vocabulary of single letters
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(sam3_folder):
    return load_encoder(sam3_folder)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


def test_sam3_folder_loads_through_load_encoder_and_encodes(encoder):
    assert isinstance(encoder, Sam3PriorEncoder) and encoder.prompts == ("lesion", "tumor", "nodule")
    images = _images(3)
    out = encoder.encode(images)
    assert out.grid == (4, 4) and encoder.feature_dim == FPN
    assert out.tokens.shape == (3, 16, FPN)
    assert out.region_mask.shape == (3, 16) and out.region_mask.dtype == torch.bool
    assert out.region_mask.any(dim=1).all()
    assert not out.tokens.requires_grad
    with torch.no_grad():  # default level: FPN scale 1 (stride 14), flattened row-major
        fpn = encoder.model.get_vision_features(pixel_values=encoder.preprocess(images)).fpn_hidden_states[2]
    assert torch.equal(out.tokens, fpn.flatten(2).transpose(1, 2))


@pytest.mark.parametrize(("level", "grid", "dim"), [("vit", (4, 4), VIT), ("fpn_2x", (8, 8), FPN),
                                                    ("fpn_0.5x", (2, 2), FPN)])
def test_feature_level_sets_tokens_grid_and_dim(encoder, level, grid, dim):
    other = Sam3PriorEncoder(encoder.model, encoder.tokenizer, encoder.preprocess_fn, Sam3Settings(feature_level=level))
    out = other.encode(_images(2))
    assert other.feature_dim == dim and out.grid == grid
    assert out.tokens.shape == (2, grid[0] * grid[1], dim) and out.region_mask.shape == (2, grid[0] * grid[1])


def test_unknown_feature_level_is_named(encoder):
    with pytest.raises(ValueError, match="fpn_3x.*vit.*fpn_1x"):
        Sam3PriorEncoder(encoder.model, encoder.tokenizer, encoder.preprocess_fn, Sam3Settings(feature_level="fpn_3x"))


def _reference_processor(size: int, mean: list[float], std: list[float]):
    """transformers' own PIL pipeline with Sam3ImageProcessor's defaults (bilinear, 1/255, mean = std = 0.5)."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling

    class Reference(PilBackend):
        resample = PILImageResampling.BILINEAR
        do_resize = do_rescale = do_normalize = do_convert_rgb = True

    return Reference(size={"height": size, "width": size}, image_mean=mean, image_std=std)


def test_preprocessing_matches_the_reference_pipeline(encoder, sam3_folder, tmp_path):
    images = _images(2) + [Image.new("L", (30, 90), 77)]  # a grayscale image is converted to RGB
    pixels = encoder.preprocess(images)
    reference = _reference_processor(SIDE, [0.5] * 3, [0.5] * 3)(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, SIDE, SIDE) and pixels.dtype == torch.float32
    assert torch.equal(pixels, reference)
    manual = (np.asarray(images[0].resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), manual, atol=1e-6)
    config = {"size": {"height": 28, "width": 28}, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4],
              "resample": 2, "rescale_factor": 1 / 255}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    custom = Sam3Preprocess.from_folder(tmp_path, (SIDE, SIDE))(images)
    reference = _reference_processor(28, config["image_mean"], config["image_std"])(images=images, return_tensors="pt")
    assert custom.shape == (3, 3, 28, 28) and torch.equal(custom, reference["pixel_values"])


def _independent_confidence(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Full forwards (vision recomputed per prompt), argmax over all (prompt, query) scores, 4 x 4 block max."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder.model.name_or_path)
    batch = pixels.shape[0]
    scores, masks = [], []
    with torch.no_grad():
        for prompt in ("lesion", "tumor", "nodule"):
            text = tokenizer([prompt] * batch, padding="max_length", max_length=32, truncation=True,
                             return_tensors="pt")
            out = encoder.model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            scores.append(out.pred_logits.sigmoid() * out.presence_logits.sigmoid())
            masks.append(out.pred_masks)
    best = torch.stack(scores, 1).flatten(1).argmax(dim=1)  # over prompts x queries
    chosen = torch.stack(masks, 1).flatten(1, 2)[torch.arange(batch), best].sigmoid()  # (B, 16, 16)
    return chosen.view(batch, 4, 4, 4, 4).amax(dim=(2, 4)).flatten(1)


def test_region_is_the_best_query_over_prompts_computed_independently(encoder, monkeypatch):
    pixels = encoder.preprocess(_images(3))
    expected = _independent_confidence(encoder, pixels)
    values = expected.flatten().unique()
    threshold = float(values[len(values) // 2] + values[len(values) // 2 + 1]) / 2  # between two values: no ties
    thresholded = Sam3PriorEncoder(encoder.model, encoder.tokenizer, encoder.preprocess_fn,
                                   Sam3Settings(threshold=threshold))
    vision_calls = []
    real_vision = thresholded.model.vision_encoder.forward
    monkeypatch.setattr(thresholded.model.vision_encoder, "forward",
                        lambda *a, **k: vision_calls.append(1) or real_vision(*a, **k))
    with torch.no_grad():
        out = thresholded.encode_pixels(pixels)
    assert len(vision_calls) == 1  # vision trunk once per batch, reused by all three prompts
    assert torch.equal(out.region_mask, top_region(expected, threshold))
    assert 0 < out.region_mask.sum() < out.region_mask.numel()
    with torch.no_grad():
        confidence = thresholded.token_confidence(thresholded.model.get_vision_features(pixel_values=pixels), (4, 4))
    assert torch.allclose(confidence, expected, atol=1e-6)


def _scripted(encoder, monkeypatch, script: dict[str, tuple[float, float, int, tuple[slice, slice]]]):
    """Per prompt: (query logit, presence logit, query index, mask block); every other query/pixel is off."""
    real_forward = encoder.model.forward
    prompt_of = {tuple(encoder.tokenizer(p, padding="max_length", max_length=32, truncation=True)["input_ids"]): p
                 for p in script}

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        logit, presence, query, block = script[prompt_of[tuple(kwargs["input_ids"][0].tolist())]]
        out.pred_logits = torch.full_like(out.pred_logits, -8.0)
        out.pred_logits[:, query] = logit
        out.presence_logits = torch.full_like(out.presence_logits, presence)
        out.pred_masks = torch.full_like(out.pred_masks, -20.0)
        out.pred_masks[:, query][:, block[0], block[1]] = 20.0
        return out

    monkeypatch.setattr(encoder.model, "forward", forward)


def test_presence_weighs_prompts_and_prompts_change_the_region(encoder, monkeypatch):
    top_left, bottom_right = (slice(0, 4), slice(0, 4)), (slice(12, 16), slice(12, 16))
    # "lesion": a confident query but the concept judged absent; "tumor": a weaker query, concept present
    script = {"lesion": (5.0, -5.0, 0, top_left), "tumor": (2.0, 2.0, 3, bottom_right),
              "nodule": (-5.0, 0.0, 1, top_left)}
    _scripted(encoder, monkeypatch, script)
    pixels = encoder.preprocess(_images(2))
    region = encoder.encode_pixels(pixels).region_mask.view(2, 4, 4)
    assert region[:, 3, 3].all() and region.sum() == 2
    only_lesion = Sam3PriorEncoder(encoder.model, encoder.tokenizer, encoder.preprocess_fn,
                                   Sam3Settings(prompts=("lesion",)))
    region = only_lesion.encode_pixels(pixels).region_mask.view(2, 4, 4)
    assert region[:, 0, 0].all() and region.sum() == 2


def test_fingerprint_follows_prompts_threshold_and_code_defaults(sam3_folder, tmp_path, monkeypatch):
    folder = tmp_path / "sam3"
    shutil.copytree(sam3_folder, folder)
    base = encoder_fingerprint(folder)
    assert encoder_settings(folder) == {"sam3": {"prompts": ["lesion", "tumor", "nodule"], "threshold": 0.5,
                                                 "feature_level": "fpn_1x"}}
    Sam3Settings(prompts=("mass", "lesion")).save(folder)
    with_prompts = encoder_fingerprint(folder)
    assert with_prompts != base
    assert load_encoder(folder).prompts == ("mass", "lesion")
    Sam3Settings(prompts=("mass", "lesion"), threshold=0.7).save(folder)
    assert encoder_fingerprint(folder) not in (base, with_prompts)
    (folder / SETTINGS_FILE).unlink()
    assert encoder_fingerprint(folder) == base
    monkeypatch.setattr(sam3_module, "DEFAULT_PROMPTS", ("polyp",))  # a changed default in code
    assert encoder_fingerprint(folder) != base
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"encoder": "tiny_seg"}))
    assert encoder_settings(tmp_path / "tiny") == {}  # other encoders' fingerprints are unchanged


def test_bad_settings_and_missing_tokenizer_are_named(sam3_folder, tmp_path):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"prompts": ["lesion"], "temperature": 2}))
    with pytest.raises(ValueError, match="temperature"):
        Sam3Settings.load(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"prompts": []}))
    with pytest.raises(ValueError, match="prompts"):
        Sam3Settings.load(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(sam3_folder / name, bare / name)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_encoder(bare)


# ---- MedSAM3 LoRA merge ----

RANK, ALPHA = 8, 32.0
SCALE = ALPHA / RANK
VB = "backbone.vision_backbone.trunk.blocks"
TB = "backbone.language_backbone.encoder.transformer.resblocks"
# native module -> (in, out, [(transformers weight, rows of the update)]); written out by hand
NATIVE_MODULES = {
    f"{VB}.0.attn.qkv": (VIT, 3 * VIT, [("vision_encoder.backbone.layers.0.attention.q_proj.weight", slice(0, 64)),
                                        ("vision_encoder.backbone.layers.0.attention.k_proj.weight", slice(64, 128)),
                                        ("vision_encoder.backbone.layers.0.attention.v_proj.weight", slice(128, 192))]),
    f"{VB}.1.attn.proj": (VIT, VIT, [("vision_encoder.backbone.layers.1.attention.o_proj.weight", None)]),
    f"{VB}.0.mlp.fc1": (VIT, 128, [("vision_encoder.backbone.layers.0.mlp.fc1.weight", None)]),
    f"{TB}.0.attn.q_proj": (TEXT, TEXT, [("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight", None)]),
    f"{TB}.0.attn.out_proj": (TEXT, TEXT, [("text_encoder.text_model.encoder.layers.0.self_attn.out_proj.weight",
                                            None)]),
    f"{TB}.0.mlp.c_fc": (TEXT, 64, [("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight", None)]),
    "geometry_encoder.encode.0.self_attn.q_proj": (FPN, FPN, [("geometry_encoder.layers.0.self_attn.q_proj.weight",
                                                               None)]),
    "transformer.encoder.layers.0.cross_attn_image.v_proj": (FPN, FPN, [("detr_encoder.layers.0.cross_attn.v_proj"
                                                                         ".weight", None)]),
    "transformer.encoder.layers.0.linear1": (FPN, 64, [("detr_encoder.layers.0.mlp.fc1.weight", None)]),
    "transformer.decoder.layers.0.ca_text.k_proj": (FPN, FPN, [("detr_decoder.layers.0.text_cross_attn.k_proj.weight",
                                                                None)]),
    "segmentation_head.cross_attend_prompt.out_proj": (FPN, FPN, [("mask_decoder.prompt_cross_attn.o_proj.weight",
                                                                   None)]),
}
PEFT_MODULE = (f"{VB}.1.mlp.fc2", 128, VIT, "vision_encoder.backbone.layers.1.mlp.fc2.weight")


def _lora_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """MedSAM3-layout pairs (A: in x r, B: r x out), one under a DDP `module.` prefix, plus one PEFT-layout pair."""
    generator = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for i, (module, (d_in, d_out, targets)) in enumerate(NATIVE_MODULES.items()):
        a, b = torch.randn(d_in, RANK, generator=generator), torch.randn(RANK, d_out, generator=generator) * 0.1
        prefix = "module." if i == 0 else ""
        state[f"{prefix}{module}.lora.lora_A"], state[f"{prefix}{module}.lora.lora_B"] = a, b
        update = SCALE * (b.T @ a.T)  # (out, in)
        for name, rows in targets:
            expected[name] = update if rows is None else update[rows]
    module, d_in, d_out, name = PEFT_MODULE
    a, b = torch.randn(RANK, d_in, generator=generator), torch.randn(d_out, RANK, generator=generator) * 0.1
    state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
    expected[name] = SCALE * (b @ a)
    return state, expected


def test_medsam3_lora_merges_exactly_onto_the_mapped_weights(sam3_folder, tmp_path, capsys):
    state, expected = _lora_state()
    torch.save(state, tmp_path / "best_lora_weights.pt")
    out = tmp_path / "medsam3"
    assert main(["--base", str(sam3_folder), "--lora", str(tmp_path / "best_lora_weights.pt"), "--out", str(out),
                 "--alpha", "32", "--rank", "8"]) == 0
    assert "merged 12 LoRA modules (24 keys" in capsys.readouterr().out
    base, merged = load_file(str(sam3_folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert merged.keys() == base.keys() and len(expected) == 14
    for name, weight in base.items():
        if name in expected:
            assert torch.allclose(merged[name], weight + expected[name], atol=1e-6, rtol=0), name
            assert not torch.equal(merged[name], weight), name
        else:
            assert torch.equal(merged[name], weight), name
    record = json.loads((out / "medsam3_merge.json").read_text())
    assert record["lora_modules"] == 12 and record["updated_parameters"] == 14 and record["ignored_keys"] == []
    assert (out / "tokenizer.json").is_file()
    encoder = load_encoder(out)  # the merged folder is a working prior encoder with its own fingerprint
    assert isinstance(encoder, Sam3PriorEncoder) and encoder.encode(_images(1)).tokens.shape == (1, 16, FPN)
    assert encoder_fingerprint(out) != encoder_fingerprint(sam3_folder)


@pytest.mark.parametrize(("extra", "message"), [
    ({f"{VB}.0.attn.bogus.lora.lora_A": torch.zeros(VIT, RANK), f"{VB}.0.attn.bogus.lora.lora_B": torch.zeros(RANK, 8)},
     r"backbone\.vision_backbone\.trunk\.blocks\.0\.attn\.bogus\.lora\.lora_A"),
    ({f"{VB}.0.mlp.fc2.lora.lora_A": torch.zeros(128, RANK)}, r"blocks\.0\.mlp\.fc2\.lora\.lora_A.*lora_B partner"),
    ({f"{VB}.0.mlp.fc2.lora.lora_A": torch.zeros(64, RANK), f"{VB}.0.mlp.fc2.lora.lora_B": torch.zeros(RANK, VIT)},
     r"blocks\.0\.mlp\.fc2\.lora\.lora_A.*does not fit"),
    ({"transformer.decoder.norm.weight": torch.zeros(FPN)}, r"transformer\.decoder\.norm\.weight"),
])
def test_unmapped_or_broken_lora_keys_are_refused_by_name(sam3_folder, tmp_path, capsys, extra, message):
    state, _ = _lora_state()
    state.update(extra)
    torch.save(state, tmp_path / "lora.pt")
    out = tmp_path / "out"
    with pytest.raises(LoraMappingError, match=message):
        merge_medsam3_lora(sam3_folder, tmp_path / "lora.pt", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt"]  # nothing written, no temporary left behind
    assert main(["--base", str(sam3_folder), "--lora", str(tmp_path / "lora.pt"), "--out", str(out)]) == 1
    assert "error: LoRA key" in capsys.readouterr().err


def test_ignored_prefixes_are_counted_and_rank_is_checked(sam3_folder, tmp_path):
    state, _ = _lora_state()
    state["tracker.model.layer.lora.lora_A"] = torch.zeros(4, RANK)
    torch.save(state, tmp_path / "lora.pt")
    report = merge_medsam3_lora(sam3_folder, tmp_path / "lora.pt", tmp_path / "out", ignore_prefixes=["tracker."])
    assert report.ignored_keys == ["tracker.model.layer.lora.lora_A"] and report.lora_modules == 12
    with pytest.raises(LoraMappingError, match="rank 8, expected 4"):
        merge_medsam3_lora(sam3_folder, tmp_path / "lora.pt", tmp_path / "out2", rank=4, ignore_prefixes=["tracker."])
    with pytest.raises(FileExistsError):
        merge_medsam3_lora(sam3_folder, tmp_path / "lora.pt", tmp_path / "out", ignore_prefixes=["tracker."])
