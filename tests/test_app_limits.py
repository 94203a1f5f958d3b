"""`medsynapse app`'s upload limits, through the page's handler (`app.ask`, no browser): the server's pixel, decoded
size and time limits and a size limit on disk; a 12000 x 12000 PNG of 17 KB is refused from its header, fast; a
refusal names the upload by its own name, never the folder Gradio stored it in."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest
from PIL import Image
from test_serve import _gzip_nifti

import medsynapse.app as app
from medsynapse.app import AppLimits, ask, read_upload

pytestmark = pytest.mark.slow

UPLOADS = "gradio/5f1e0c2a9b"  # where Gradio keeps an upload: a folder of its own under its temporary root


def _upload(tmp_path: Path, name: str, data: bytes | None = None) -> Path:
    folder = tmp_path / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if data is not None:
        path.write_bytes(data)
    return path


def _refusal(path: Path, limits: AppLimits | None = None) -> str:
    """The page's error line for an upload (the handler with no model: a refused upload never reaches one)."""
    result = ask({}, limits or AppLimits(), 6, str(path), "as stored", 40, 400, "axial", -1, "q")
    assert len(result) == 1 and result[0].startswith("**Cannot read the scan:**"), result
    assert str(path.parent) not in result[0] and "gradio" not in result[0], result[0]  # no server path
    return result[0]


def test_a_huge_png_of_17_kb_is_refused_from_its_header_fast(tmp_path):
    path = _upload(tmp_path, "huge.png")
    Image.new("1", (12000, 12000)).save(path)  # 144 M pixels in 17 KB of PNG
    assert path.stat().st_size < 20_000
    _refusal(_upload(tmp_path, "warm.png", b"not a png"))  # imports done before the clock starts
    start = time.perf_counter()
    message = _refusal(path)
    assert time.perf_counter() - start < 1.0  # decoded, it would be 432 MB of RGB and seconds of work
    assert "huge.png: 12000x12000 = 144000000 pixels, more than --max-pixels 16777216" in message


def test_a_truncated_upload_is_named_by_its_own_name_only(tmp_path):
    import io

    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    good = buffer.getvalue()
    message = _refusal(_upload(tmp_path, "cut.png", good[: len(good) // 3]))
    assert "cut.png: corrupt or unreadable image" in message and "truncated" in message


def test_an_upload_over_the_size_limit_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    path = _upload(tmp_path, "big.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(path)
    size = path.stat().st_size
    monkeypatch.setattr(app, "check_upload", lambda *a: pytest.fail("opened despite its size"))
    message = _refusal(path, AppLimits(max_file_bytes=size - 1))
    assert f"big.png: {size} bytes, more than {size - 1} (--max-file-mb)" in message


def test_a_compressed_upload_is_inflated_at_most_to_the_decoded_limit(tmp_path):
    _, data = _gzip_nifti(8)  # a few KB that inflate past 8 MiB
    message = _refusal(_upload(tmp_path, "bomb.nii.gz", data), AppLimits(max_decoded_bytes=2**20))
    assert "bomb.nii.gz: the compressed data inflates to more than 1048576 bytes" in message


def test_a_slow_decode_is_refused_at_the_time_limit(tmp_path, monkeypatch):
    path = _upload(tmp_path, "slow.png")
    Image.new("RGB", (32, 32)).save(path)
    monkeypatch.setattr(app, "load_scan", lambda *a, **k: time.sleep(3))
    start = time.perf_counter()
    message = _refusal(path, AppLimits(timeout_s=0.3))
    assert time.perf_counter() - start < 2.0
    assert "slow.png: not read within 0.3 s (--timeout)" in message


def test_an_upload_within_the_limits_is_read(tmp_path):
    path = _upload(tmp_path, "fine.png")
    Image.new("L", (40, 30), 128).save(path)
    image = read_upload(str(path), "as stored", 40, 400, limits=AppLimits(max_pixels=40 * 30))
    assert image.size == (40, 30) and image.mode == "RGB"


def test_the_probe_maps_are_laid_out_per_layer_in_rows_of_per_row():
    """(layers, N) maps: per layer ceil(N / per_row) rows of at most per_row columns, fewer columns when N is small
    (the figure's size follows the grid: 0.75 in per column and 0.8 in per row, at 100 dpi, at least 4 in wide)."""
    import matplotlib
    import numpy as np

    from medsynapse.app import heatmap_grid

    dpi = matplotlib.rcParams["figure.dpi"]
    maps = np.random.default_rng(0).random((2, 10, 3, 3))
    assert heatmap_grid(maps, "t", per_row=4).size == (round(4.0 * dpi), round((0.8 * 2 * 3 + 0.6) * dpi))
    assert heatmap_grid(maps[:, :8], "t", per_row=4).size == (round(4.0 * dpi), round((0.8 * 2 * 2 + 0.6) * dpi))
    assert heatmap_grid(maps, "t", per_row=8).size == (round((0.75 * 8 + 0.6) * dpi), round((0.8 * 4 + 0.6) * dpi))
    assert heatmap_grid(maps[:1, :3], "t", per_row=8).size == (round(4.0 * dpi), round(1.4 * dpi))
    wide = np.random.default_rng(1).random((1, 6, 3, 3))
    assert heatmap_grid(wide, "t", per_row=8).size == (round((0.75 * 6 + 0.6) * dpi), round(1.4 * dpi))


def test_the_nifti_view_offers_each_axis_the_reader_takes_and_starts_on_one(tmp_path):
    from medsynapse.data.views import VIEW_AXES

    page = app.build({})
    (view,) = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "view"]
    offered = [choice[1] if isinstance(choice, tuple) else choice for choice in view.choices]
    assert offered == list(VIEW_AXES) and view.value in VIEW_AXES
    path = _upload(tmp_path, "ct.nii.gz", _gzip_nifti(0)[1])  # 8 x 8 x 4 voxels
    shapes = {axis: read_upload(str(path), "as stored", 40, 400, axis=axis).size for axis in offered}
    assert shapes == {"axial": (8, 8), "coronal": (8, 4), "sagittal": (8, 4)}, shapes


def test_the_file_picker_offers_every_kind_the_app_reads_and_each_offered_kind_is_read(tmp_path):
    """The browser's file filter is the page's first gate: a `.dicom` or `.nii.gz` scan it hides cannot be asked about;
    a suffix it offers that no reader takes would be a dead end."""
    import numpy as np
    from conftest import write_dicom

    from medsynapse.data.images import DICOM_SUFFIXES
    from medsynapse.data.views import NIFTI_SUFFIXES

    page = app.build({})
    (picker,) = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "scan"]
    offered = set(picker.file_types)
    assert offered == set(app.UPLOAD_SUFFIXES)
    names = ["scan.png", "scan.jpg", "scan.jpeg", *(f"scan{suffix}" for suffix in DICOM_SUFFIXES + NIFTI_SUFFIXES)]
    for name in names:
        assert any(name.endswith(suffix) for suffix in offered), name
    assert all(any(name.endswith(suffix) for name in names) for suffix in offered), offered
    for name in names:
        path = _upload(tmp_path, name)
        if name.endswith(DICOM_SUFFIXES):
            write_dicom(path, np.full((8, 8), 100, dtype=np.uint16))
        elif name.endswith(".nii.gz"):
            path.write_bytes(_gzip_nifti(0)[1])
        elif name.endswith(".nii"):
            path.write_bytes(gzip.decompress(_gzip_nifti(0)[1]))
        else:
            Image.new("L", (8, 8), 100).save(path, format="JPEG" if name.endswith(("jpg", "jpeg")) else "PNG")
        assert read_upload(str(path), "as stored", 40, 400).size == (8, 8), name
