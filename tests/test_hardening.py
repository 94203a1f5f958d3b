"""No silent data loss or corruption: one writer per eval folder, checkpoints owned by their run and checked on
resume, no hub fallback for a missing adapter, images read with their full range and colours."""

from __future__ import annotations

import json
import os
import socket
import warnings

import numpy as np
import pytest
import torch
from conftest import Interrupted, crash_at, stage1_config, write_dicom
from PIL import Image
from safetensors.torch import load_file

from medsynapse.data.images import load_image
from medsynapse.locking import FolderInUseError, exclusive_output, write_text_atomic
from medsynapse.recipes.stage1_warmup import train_stage1


def _stage1_config(tiny_env, out, **overrides):
    """Checkpoints at every one of 4 steps."""
    return stage1_config(tiny_env, out, **{"max_steps": 4, "save_every": 1, **overrides})


# --- one writer per eval folder -------------------------------------------------------------------------------------
def test_a_second_eval_into_a_busy_folder_is_refused_and_writes_nothing(tiny_env, tmp_path):
    from medsynapse.data.sources.fixtures import write_fixtures
    from medsynapse.eval.runner import EvalSettings, evaluate_benchmarks

    data_root = write_fixtures(tmp_path / "data")
    out = tmp_path / "eval"
    with exclusive_output(out, "evaluation"):  # what a first `medsynapse eval` holds while it runs
        with pytest.raises(FolderInUseError, match="another medsynapse process is writing into this folder"):
            evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad"], data_root, out, EvalSettings(max_new_tokens=2))
        assert sorted(p.name for p in out.iterdir()) == [".medsynapse.lock"]  # nothing else written
    # once the first one is done, the folder is free again
    evaluate_benchmarks(str(tiny_env.vlm), ["vqa-rad"], data_root, out, EvalSettings(max_new_tokens=2))
    assert (out / "vqa-rad" / "predictions.jsonl").is_file()


@pytest.mark.parametrize("recipe", ["stage1", "sft"])
def test_a_second_training_into_a_busy_folder_is_refused_and_writes_nothing(tiny_env, tmp_path, recipe):
    from medsynapse.recipes.sft import SFTConfig, train_sft

    out = tmp_path / recipe
    sft = SFTConfig(model=str(tiny_env.vlm), train_file=str(tiny_env.train_file), output_dir=str(out), batch_size=4,
                    lora_r=4, lora_alpha=8, max_steps=2)
    run = (lambda: train_stage1(_stage1_config(tiny_env, out))) if recipe == "stage1" else (lambda: train_sft(sft))
    with exclusive_output(out, "training run"):  # what a first training holds while it runs
        with pytest.raises(FolderInUseError, match="another medsynapse process is writing into this folder"):
            run()
        assert sorted(p.name for p in out.iterdir()) == [".medsynapse.lock"]  # no checkpoint, no log
    assert run().is_dir()  # free again once the first one is done


def test_a_crashed_training_frees_its_folder_for_the_resume(tiny_env, tmp_path):
    out = tmp_path / "crashed"
    with pytest.raises(Interrupted):  # the recipe dies inside its loop, in this process
        train_stage1(_stage1_config(tiny_env, out), on_step=crash_at(2))
    assert train_stage1(_stage1_config(tiny_env, out, resume=True)).is_dir()  # the same process resumes into it
    with exclusive_output(out, "check"):  # and nothing holds the lock after the run
        pass


def test_the_lock_is_held_across_processes_and_dropped_when_the_holder_dies(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom medsynapse.locking import exclusive_output\n"
         f"with exclusive_output({str(out)!r}, 'evaluation'):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError), exclusive_output(out, "evaluation"):
            pass
    finally:
        holder.kill()  # kill -9: the OS releases the lock, no stale lock file blocks the next run
        holder.wait()
    with exclusive_output(out, "evaluation"):
        pass


def test_atomic_write_keeps_the_old_file_when_the_rename_fails_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_text_atomic(target, "old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_busy_folder_is_refused_at_once_not_once_its_holder_lets_go(tmp_path, monkeypatch):
    """The refusal comes at once, while the first writer still holds the folder. A second writer that waited for the
    lock (a blocking or timed acquire) would get it when the holder lets go and then write after it into the same
    files, which the lock is there to prevent. Here the holder lets go as soon as the attempt waits (its first
    sleep; or after 20 s), so any waiting attempt ends up holding the folder instead of being refused."""
    import threading
    import time

    out = tmp_path / "busy"
    held, finish = threading.Event(), threading.Event()

    def holder():
        with exclusive_output(out, "evaluation"):
            held.set()
            finish.wait(timeout=20)

    thread = threading.Thread(target=holder)
    attempt, sleep, waits = threading.current_thread(), time.sleep, []

    def let_go_if_the_attempt_waits(seconds):
        if threading.current_thread() is attempt:
            waits.append(seconds)
            finish.set()
            thread.join()
        sleep(seconds)

    thread.start()
    try:
        assert held.wait(timeout=60)
        monkeypatch.setattr(time, "sleep", let_go_if_the_attempt_waits)
        with pytest.raises(FolderInUseError, match=r"busy: another medsynapse process is writing into this folder "
                                                   r"\(it holds .*\.medsynapse\.lock\); wait for it to finish or give "
                                                   r"this evaluation another output folder"), \
                exclusive_output(out, "evaluation"):
            pass
        monkeypatch.undo()
        assert waits == [] and thread.is_alive()  # refused without waiting, while the holder still held it
    finally:
        finish.set()
        thread.join()
    with exclusive_output(out, "evaluation"):  # free once the holder is done
        pass


def test_atomic_write_renames_inside_the_folder_and_leaves_a_readable_file(tmp_path, monkeypatch):
    """The temporary file is in the target's folder (a rename is atomic only within one file system; one in /tmp
    would be a copy across devices, or fail) and the result is a normal 0644 file (mkstemp's 0600 would hide
    predictions and reports from the other users of a shared machine)."""
    target = tmp_path / "report.md"
    renames = []
    replace = os.replace

    def recording(src, dst):
        renames.append((os.path.dirname(src), os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    previous = os.umask(0o022)  # the mode a new file gets under the usual umask (any umask: test_relocatable)
    try:
        write_text_atomic(target, "résumé\n")
    finally:
        os.umask(previous)
    assert renames == [(str(tmp_path), str(target))]
    assert target.read_bytes() == "résumé\n".encode() and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# --- checkpoints belong to their run ---------------------------------------------------------------------------------
def test_a_new_run_over_another_runs_checkpoints_is_refused_and_they_are_kept(tiny_env, tmp_path):
    out = tmp_path / "s1"
    train_stage1(_stage1_config(tiny_env, out))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(up to step_0000004\); continue it "
                                         r"with --resume \(resume: true\), or train into another output_dir$"):
        train_stage1(_stage1_config(tiny_env, out, lr=5e-3, max_steps=8))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_with_other_settings_or_past_the_end_is_refused(tiny_env, tmp_path):
    out = tmp_path / "s1"
    train_stage1(_stage1_config(tiny_env, out))
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        train_stage1(_stage1_config(tiny_env, out, lr=5e-3, resume=True))
    with pytest.raises(ValueError, match=r"other settings \(max_steps differ\)"):  # another schedule
        train_stage1(_stage1_config(tiny_env, out, max_steps=2, resume=True))
    # a checkpoint from before settings were recorded is accepted, but never past the run's end
    state_file = out / "checkpoints" / "step_0000004" / "state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="step 4 is past this run's 2 steps"):
        train_stage1(_stage1_config(tiny_env, out, max_steps=2, resume=True))


def test_resume_with_no_checkpoint_says_so(tiny_env, tmp_path):
    with pytest.warns(UserWarning, match="no intact checkpoint"):
        train_stage1(_stage1_config(tiny_env, tmp_path / "fresh", max_steps=1, resume=True))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tiny_env, tmp_path):
    straight = train_stage1(_stage1_config(tiny_env, tmp_path / "a"))
    out = tmp_path / "b"
    from conftest import Interrupted, crash_at

    with pytest.raises(Interrupted):
        train_stage1(_stage1_config(tiny_env, out), on_step=crash_at(3))
    damaged = out / "checkpoints" / "step_0000003" / "optimizer.pt"
    damaged.write_bytes(b"")  # what a power loss leaves of an unsynced file
    with pytest.warns(UserWarning, match=str(damaged)):
        resumed = train_stage1(_stage1_config(tiny_env, out, resume=True))
    a, b = load_file(str(straight / "sampler.safetensors")), load_file(str(resumed / "sampler.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2: the same weights as never interrupted


def test_checkpoints_record_the_run_settings(tiny_env, tmp_path):
    out = train_stage1(_stage1_config(tiny_env, tmp_path / "s1", max_steps=1))
    state = json.loads((out / "checkpoints" / "step_0000001" / "state.json").read_text())
    assert state["step"] == 1 and state["settings"]["lr"] == 1e-3 and "resume" not in state["settings"]


@pytest.mark.parametrize("steps", [-1, -100])
def test_negative_steps_are_refused_before_anything_is_loaded(tiny_env, tmp_path, monkeypatch, steps):
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.recipes.stage2_ccr import Stage2Config, train_stage2
    from medsynapse.recipes.stage3_imt import Stage3Config, train_stage3

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(MedSynapseV, "build", never)
    monkeypatch.setattr(MedSynapseV, "from_pretrained", never)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 0"):
        train_stage1(_stage1_config(tiny_env, tmp_path / "s1", max_steps=steps))
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        train_stage2(Stage2Config(model="x", train_file="x", output_dir=str(tmp_path / "s2"), max_steps=steps))
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        train_stage3(Stage3Config(model="x", train_file="x", output_dir=str(tmp_path / "s3"), max_steps=steps))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


# --- no hub fallback --------------------------------------------------------------------------------------------------
def test_a_missing_adapter_file_is_a_local_error_and_nothing_touches_the_network(tiny_env, tmp_path, monkeypatch):
    from medsynapse.model.medsynapse import MedSynapseV
    from medsynapse.model.processor import ModelNotFoundError

    model = MedSynapseV.build(str(tiny_env.vlm), str(tiny_env.encoder), n_memory=4, width=32, dtype="float32")
    model.add_lora(4, 8, 0.0, ["q_proj", "v_proj"])
    folder = tmp_path / "ns" / "name"  # a relative `ns/name` would look like a hub repo id to peft
    model.save_pretrained(folder)
    manifest = json.loads((folder / "medsynapse.json").read_text())
    missing = folder / manifest["adapter"] / "adapter_model.safetensors"
    missing.unlink()
    attempts = []

    def blocked(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="adapter_model.safetensors"):
        MedSynapseV.from_pretrained("ns/name")
    assert attempts == []


# --- images as they are -----------------------------------------------------------------------------------------------
def test_a_16_bit_grey_png_keeps_its_range(tmp_path):
    scan = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (32, 1))  # 12-bit data in a 16-bit PNG
    path = tmp_path / "scan.png"
    Image.fromarray(scan).save(path)
    assert Image.open(path).mode.startswith("I")
    grey = np.asarray(load_image(str(path)))[..., 0].astype(float)
    assert (grey == 255).mean() < 0.05  # PIL's own conversion puts ~94 % of such pixels at 255
    assert np.abs(grey[0] - scan[0].astype(float) * 255 / 4095).max() <= 0.5 + 1e-9
    full = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # real 16-bit data
    Image.fromarray(full).save(tmp_path / "full.png")
    loaded = np.asarray(load_image(str(tmp_path / "full.png")))[0, :, 0].astype(float)
    assert np.abs(loaded - full[0].astype(float) * 255 / 65535).max() <= 0.5 + 1e-9


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not shipped with this pydicom")
    return path


def test_16_bit_rgb_dicom_keeps_its_range_instead_of_wrapping():
    import pydicom

    path = _pydicom_file("SC_rgb_rle_16bit.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(float)
    assert raw.max() > 255  # really 16-bit colour
    rgb = np.asarray(load_image(path)).astype(float)
    assert np.abs(rgb - raw * 255 / 65535).max() <= 0.5 + 1e-9


def test_synthetic_16_bit_rgb_dicom_keeps_its_range(tmp_path):
    """pydicom's 16-bit RGB file holds 8-bit values × 257, which wrap to themselves modulo 256; these do not."""
    rgb16 = (np.arange(8 * 8 * 3, dtype=np.uint32).reshape(8, 8, 3) * 331 % 65536).astype(np.uint16)
    path = tmp_path / "rgb16.dcm"
    write_dicom(path, rgb16)
    loaded = np.asarray(load_image(str(path))).astype(float)
    assert np.abs(loaded - rgb16.astype(float) * 255 / 65535).max() <= 0.5 + 1e-9


def test_palette_colour_dicom_is_shown_in_its_colours():
    import pydicom
    from pydicom.pixels import apply_color_lut

    path = _pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    colours = apply_color_lut(ds.pixel_array, ds).astype(float)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    rgb = np.asarray(load_image(path)).astype(float)
    assert rgb.shape == colours.shape[-3:]
    assert np.abs(rgb - colours * 255 / (2**bits - 1)).max() <= 0.5 + 1e-9
    assert (rgb[..., 0] != rgb[..., 1]).mean() > 0.1  # colours, not the grey indices


def test_an_oversized_image_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    from medsynapse.data.schema import DataError

    path = tmp_path / "huge.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: PIL's DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="huge.png: image too large"):
            load_image(str(path))


# every codec hospitals export, from the files pydicom ships: lossless ones decode to the uncompressed reference
LOSSLESS_PAIRS = [("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"), ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
                  ("MR_small_RLE.dcm", "MR_small.dcm")]
COMPRESSED = ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
              "SC_rgb_rle_16bit_2frame.dcm", "693_J2KI.dcm", "SC_rgb_jls_lossy_line.dcm"]


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_dicom_loads(name):
    image = np.asarray(load_image(_pydicom_file(name)))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 1


@pytest.mark.parametrize(("compressed", "reference"), LOSSLESS_PAIRS)
def test_lossless_dicom_codecs_decode_to_the_uncompressed_image(compressed, reference):
    assert np.array_equal(np.asarray(load_image(_pydicom_file(compressed))),
                          np.asarray(load_image(_pydicom_file(reference))))


def test_12_bit_jpeg_with_a_progressive_scan_header_decodes_as_ijg_libjpeg_reads_it():
    """JPEG-lossy.dcm (12-bit JPEG Extended, Se 0 in its start-of-scan header): pylibjpeg and Pillow refuse it as
    stored; read as IJG libjpeg reads it, it is the image of its fixed copy JPGExtended.dcm, value for value."""
    import pydicom

    from medsynapse.data.images import dicom_pixels, sequential_scan_fixed

    lossy, fixed = pydicom.dcmread(_pydicom_file("JPEG-lossy.dcm")), pydicom.dcmread(_pydicom_file("JPGExtended.dcm"))
    assert lossy.BitsStored == 12 and str(lossy.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.51"
    assert np.array_equal(dicom_pixels(lossy, "JPEG-lossy.dcm"), fixed.pixel_array)
    assert np.array_equal(np.asarray(load_image(_pydicom_file("JPEG-lossy.dcm"))),
                          np.asarray(load_image(_pydicom_file("JPGExtended.dcm"))))
    frame = next(pydicom.encaps.generate_frames(fixed.PixelData, number_of_frames=1))
    repaired = next(pydicom.encaps.generate_frames(lossy.PixelData, number_of_frames=1))
    assert repaired == frame  # the repair is exactly NEMA's fix, byte for byte
    assert frame[:2] == b"\xff\xd8" and sequential_scan_fixed(frame) == frame  # a valid stream is left as it is


def test_an_undecodable_compressed_dicom_is_one_line_naming_file_syntax_and_decoders(tmp_path, capsys):
    import pydicom

    from medsynapse.cli import main
    from medsynapse.data.schema import DataError

    ds = pydicom.dcmread(_pydicom_file("JPGExtended.dcm"))
    frame = bytes(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    start = frame.find(b"\xff\xc4")  # its Huffman tables (DHT segment) removed: no decoder can read the scan
    end = start + 2 + int.from_bytes(frame[start + 2:start + 4], "big")
    ds.PixelData = pydicom.encaps.encapsulate([frame[:start] + frame[end:]])
    path = tmp_path / "damaged.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match=r"damaged\.dcm: its JPEG Extended \(Process 2 and 4\) pixel data cannot be "
                                        r"decoded by the installed decoders \(pylibjpeg: .*; pillow: .*\)"):
        load_image(str(path))
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path), "--image", str(path), "--question", "q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "damaged.dcm: its JPEG Extended" in err, err


def test_a_dicom_without_extension_is_recognised(tmp_path):
    import shutil

    plain = tmp_path / "IM0001"  # as PACS exports name them
    shutil.copy(_pydicom_file("CT_small.dcm"), plain)
    assert np.array_equal(np.asarray(load_image(str(plain))), np.asarray(load_image(_pydicom_file("CT_small.dcm"))))
