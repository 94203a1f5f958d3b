"""SynthMed generation and the sample schema's error reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsynapse.data.schema import DataError, read_samples
from medsynapse.data.synthmed import generate_split, render_scan
from medsynapse.recipes.stage1_warmup import Stage1Config, train_stage1


def test_synthmed_is_deterministic_and_splits_share_no_image(tmp_path):
    a = generate_split(tmp_path / "a", "train", 6, seed=3)
    b = generate_split(tmp_path / "b", "train", 6, seed=3)
    assert a.read_text() == b.read_text()
    for name in (tmp_path / "a" / "images").iterdir():
        twin = tmp_path / "b" / "images" / name.name
        assert np.array_equal(np.asarray(Image.open(name)), np.asarray(Image.open(twin)))
    test = generate_split(tmp_path / "a", "test", 6, seed=3)
    train_pixels = {np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "a" / "images").glob("train_*.png")}
    test_pixels = {np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "a" / "images").glob("test_*.png")}
    assert not train_pixels & test_pixels
    assert {s.images[0] for s in read_samples(a)}.isdisjoint({s.images[0] for s in read_samples(test)})


def test_synthmed_questions_match_the_masks(tmp_path):
    path = generate_split(tmp_path, "train", 20, seed=1)
    samples = read_samples(path)
    families = {s.family for s in samples}
    assert families == {"general", "lesion"}
    assert {s.answer_type for s in samples} == {"yes_no", "multiple_choice", "open", "caption"}
    assert {s.modality for s in samples} <= {"CT", "MRI", "X-ray", "pathology"}
    for s in samples:
        if s.question_type == "presence":
            has_lesion = np.asarray(Image.open(s.mask)).max() > 0
            assert (s.answer == "yes") == has_lesion
        if s.answer_type == "multiple_choice":
            assert s.answer in s.options


def test_lesions_stay_clear_of_the_midlines():
    for index in range(30):
        scan = render_scan(np.random.default_rng([7, index]))
        for lesion in scan.lesions:
            assert abs(lesion.y - 32) >= lesion.radius + 3 and abs(lesion.x - 32) >= lesion.radius + 3


def _write_records(path, records):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records) + "\n")


GOOD = {"id": "r1", "images": ["img.png"], "question": "Is there a lesion?", "answer": "yes", "answer_type": "yes_no"}


@pytest.mark.parametrize("record, field", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, "'answer'"),
    ({**GOOD, "images": "img.png"}, "'images'"),
    ({**GOOD, "answer_type": "essay"}, "'answer_type'"),
    ({**GOOD, "answer_type": "multiple_choice", "options": {"A": "x"}, "answer": "B"}, "'answer'"),
    ({**GOOD, "colour": "red"}, "colour"),
])
def test_malformed_record_names_file_record_and_field(tmp_path, record, field):
    path = tmp_path / "train.jsonl"
    _write_records(path, [GOOD, record])
    with pytest.raises(DataError) as err:
        read_samples(path)
    message = str(err.value)
    assert str(path) in message and "record 2" in message and field in message


def test_invalid_json_names_file_and_record(tmp_path):
    path = tmp_path / "train.jsonl"
    _write_records(path, [GOOD, "{not json"])
    with pytest.raises(DataError, match=r"train.jsonl, record 2: not valid JSON"):
        read_samples(path)


def test_corrupt_image_in_training_file_stops_stage1_naming_file_and_record(tiny_env, tmp_path):
    data = tmp_path / "data"
    path = generate_split(data, "train", 3, seed=5)
    victim = read_samples(path)[4]
    with open(victim.images[0], "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really a png")
    config = Stage1Config(vlm=str(tiny_env.vlm), encoder=str(tiny_env.encoder), train_file=str(path),
                          output_dir=str(tmp_path / "out"), n_memory=4, sampler_width=32, batch_size=2, max_steps=1)
    with pytest.raises(DataError) as err:
        train_stage1(config)
    assert victim.images[0] in str(err.value)
    assert "train_00000_q0" in str(err.value)  # the first record that uses the image


def test_healthy_twin_is_the_same_scan_without_its_lesions():
    """`paint_lesions=False` keeps every random choice (anatomy, lesion draws, noise): outside the lesions the twin is
    the scan pixel for pixel, inside they differ, and the labels are the scan's."""
    for index in range(40):
        scan = render_scan(np.random.default_rng([0, 1, index]))
        twin = render_scan(np.random.default_rng([0, 1, index]), paint_lesions=False)
        assert scan.lesions == twin.lesions and np.array_equal(scan.mask, twin.mask)
        assert np.array_equal(scan.image[~scan.mask], twin.image[~scan.mask])
        if scan.lesions:
            difference = np.abs(scan.image.astype(int) - twin.image.astype(int))[scan.mask].mean()
            assert difference > 20  # the lesion's contrast (0.3 of the range, noise aside) is gone in the twin
