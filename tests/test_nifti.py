"""NIfTI volumes: the slice (or a maximum-intensity projection) a user names, reoriented by the affine into the
radiological convention (checked by value on volumes written here with several voxel orders), windowing, refusals,
and every entry point: the JSONL image entry, `predict`, the server's data URIs and the app's loader."""

from __future__ import annotations

import base64
import json

import nibabel as nib
import numpy as np
import pytest

from medsynapse.data.images import VolumeView, load_image
from medsynapse.data.schema import DataError, read_samples
from medsynapse.data.views import volume_entry

X, Y, Z = 6, 8, 5
MARK = (0, 7, 1)  # the patient's far left (x small in RAS+), most anterior, slice 1 from the feet


def ras_volume() -> np.ndarray:
    data = np.zeros((X, Y, Z), dtype=np.int16)
    data[MARK] = 100
    data[5, 0, 4] = 60  # the patient's right, posterior, near the head
    return data


def save(path, data, affine=None, zooms=None) -> str:
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if zooms is not None:
        image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return str(path)


def pixels(path: str, **view) -> np.ndarray:
    return np.asarray(load_image(path, view=VolumeView(**view)))[..., 0]


def brightest(image: np.ndarray) -> tuple[int, int]:
    return tuple(int(i) for i in np.unravel_index(np.argmax(image), image.shape))


def test_axial_coronal_and_sagittal_views_follow_the_radiological_convention(tmp_path):
    path = save(tmp_path / "ras.nii.gz", ras_volume())
    axial = pixels(path, slice=1)
    assert axial.shape == (Y, X)  # rows: anterior -> posterior; columns: patient's right -> left
    assert brightest(axial) == (0, X - 1)  # anterior at the top, the patient's left on the image's right
    coronal = pixels(path, axis="coronal", slice=7)
    assert coronal.shape == (Z, X) and brightest(coronal) == (Z - 1 - 1, X - 1)  # superior at the top
    sagittal = pixels(path, axis="sagittal", slice=0)
    assert sagittal.shape == (Z, Y) and brightest(sagittal) == (Z - 1 - 1, 0)  # anterior on the left


@pytest.mark.parametrize("layout", ["lps", "permuted", "z_flipped"])
def test_the_same_anatomy_stored_in_another_voxel_order_gives_the_same_images(tmp_path, layout):
    reference = save(tmp_path / "ras.nii.gz", ras_volume())
    if layout == "lps":  # as many DICOM converters write it: x and y stored right-to-left and front-to-back
        data = ras_volume()[::-1, ::-1, :].copy()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        affine[:3, 3] = [X - 1, Y - 1, 0]
    elif layout == "permuted":  # voxel axes (z, x, y)
        data = ras_volume().transpose(2, 0, 1).copy()
        affine = np.array([[0.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    else:  # slices stored head first
        data = ras_volume()[:, :, ::-1].copy()
        affine = np.diag([1.0, 1.0, -1.0, 1.0])
        affine[2, 3] = Z - 1
    other = save(tmp_path / f"{layout}.nii.gz", data, affine)
    axial_index = Z - 1 - 1 if layout == "z_flipped" else 1  # slices are numbered as stored
    assert np.array_equal(pixels(other, slice=axial_index), pixels(reference, slice=1))
    coronal_index = Y - 1 - 7 if layout == "lps" else 7  # voxel numbering along the stored (flipped) axis
    assert np.array_equal(pixels(other, axis="coronal", slice=coronal_index), pixels(reference, axis="coronal",
                                                                                       slice=7))
    sagittal_index = X - 1 - X // 2 if layout == "lps" else X // 2  # the default: the middle of the stored order
    assert np.array_equal(pixels(other, axis="sagittal"), pixels(reference, axis="sagittal", slice=sagittal_index))


ZOOMS = (1.0, 2.0, 3.0)  # mm along RAS+ x, y, z: every plane has non-square voxels, each plane a different aspect
AX, AY, AZ = 7, 5, 6  # a volume whose three sides differ, so a transposed image has another shape


def anisotropic_volume() -> np.ndarray:
    """Distinct values in every voxel (a shifted or transposed image cannot match by chance)."""
    return np.random.default_rng(0).permutation(AX * AY * AZ).reshape(AX, AY, AZ).astype(np.int16) + 1


def store(data: np.ndarray, order: tuple[int, int, int], signs: tuple[int, int, int]):
    """The RAS+ volume `data` (voxel sizes ZOOMS) stored with voxel axis k running along RAS+ axis order[k], in the
    direction signs[k]: the voxels and the affine a scanner's converter would write for the same anatomy."""
    stored = data.transpose(order)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for k, (axis, sign) in enumerate(zip(order, signs)):
        if sign < 0:
            stored = np.flip(stored, axis=k)
        affine[axis, k] = sign * ZOOMS[axis]
        affine[axis, 3] = 0.0 if sign > 0 else ZOOMS[axis] * (data.shape[axis] - 1)  # voxel 0 at the far end
    return np.ascontiguousarray(stored), affine


@pytest.mark.parametrize(("order", "signs"), [
    ((2, 0, 1), (1, -1, 1)),  # stored (z, x, y), x right to left
    ((1, 2, 0), (-1, 1, -1)),  # stored (y, z, x), y front to back, x right to left
    ((0, 1, 2), (-1, -1, 1)),  # LPS, as many DICOM converters write it
    ((2, 1, 0), (-1, 1, 1)),  # stored (z, y, x), slices head first
])
def test_anisotropic_voxels_in_any_voxel_order_give_the_ras_images_at_their_physical_aspect(tmp_path, order, signs):
    """Voxel sizes 1 × 2 × 3 mm stored in a permuted, flipped order: each view equals, in shape and in every pixel,
    the view of the same anatomy stored RAS+, and that view has the physical aspect (a 2 mm row twice as tall as a
    1 mm column). With isotropic voxels a view that takes the voxel sizes from the wrong axes looks right."""
    reference = save(tmp_path / "ras.nii.gz", anisotropic_volume(), np.diag([*ZOOMS, 1.0]))
    assert nib.load(reference).header.get_zooms() == ZOOMS
    data, affine = store(anisotropic_volume(), order, signs)
    other = save(tmp_path / "other.nii.gz", data, affine)
    assert tuple(nib.load(other).header.get_zooms()) == tuple(ZOOMS[a] for a in order)  # sizes in file order
    sizes = (AX, AY, AZ)
    # (view, RAS+ axis it slices, a slice, its shape: rows × columns in mm / the finer of the two)
    for axis, ras, index, shape in (("axial", 2, 2, (AY * 2, AX)),  # rows y (2 mm), columns x (1 mm)
                                    ("coronal", 1, 3, (AZ * 3, AX)),  # rows z (3 mm), columns x (1 mm)
                                    ("sagittal", 0, 4, (AZ * 3 // 2, AY))):  # rows z (3 mm), columns y (2 mm)
        expected = pixels(reference, axis=axis, slice=index)
        assert expected.shape == shape, (axis, expected.shape)
        k = order.index(ras)  # the stored voxel axis along the view's direction, numbered as stored
        stored_index = index if signs[k] > 0 else sizes[ras] - 1 - index
        got = pixels(other, axis=axis, slice=stored_index)
        assert got.shape == expected.shape, (axis, got.shape, expected.shape)
        assert np.array_equal(got, expected), axis


def test_projection_window_middle_slice_and_physical_aspect(tmp_path):
    path = save(tmp_path / "ras.nii", ras_volume())
    mip = pixels(path, mip=(1, 4))  # both marks, each where its own slice shows it
    assert mip[0, X - 1] == 255 and mip[Y - 1, 0] == round(60 / 100 * 255)
    assert pixels(path, slice=1, window=(50.0, 100.0))[0, X - 1] == 255
    assert pixels(path, slice=1, window=(150.0, 100.0))[0, X - 1] == 0  # below the window: black
    assert np.array_equal(pixels(path), pixels(path, slice=Z // 2))  # no slice given: the middle one
    stretched = save(tmp_path / "aniso.nii.gz", ras_volume(), zooms=(1.0, 2.0, 3.0))
    assert pixels(stretched, slice=1).shape == (2 * Y, X)  # 2 mm rows shown twice as tall as 1 mm columns
    image = nib.Nifti1Image(ras_volume(), np.eye(4))
    image.header["cal_min"], image.header["cal_max"] = 0, 200  # the file's display range
    nib.save(image, str(tmp_path / "cal.nii.gz"))
    assert pixels(str(tmp_path / "cal.nii.gz"), slice=1)[0, X - 1] == round(100 / 200 * 255)


def test_four_d_files_out_of_range_slices_and_damaged_files_get_one_clear_error(tmp_path):
    four_d = save(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 4, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"4-D NIfTI volume of shape \(4, 4, 4, 3\).*extract one first"):
        load_image(four_d)
    single = save(tmp_path / "one.nii.gz", np.ones((4, 4, 4, 1), dtype=np.float32))
    assert load_image(single).size == (4, 4)  # one volume in a 4-D file is read
    path = save(tmp_path / "ras.nii.gz", ras_volume())
    with pytest.raises(DataError, match="slice 9 is outside the volume's 5 axial slices"):
        load_image(path, view=VolumeView(slice=9))
    with pytest.raises(DataError, match="corrupt or unreadable NIfTI"):
        (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
        load_image(str(tmp_path / "bad.nii.gz"))
    with pytest.raises(DataError, match="applies to NIfTI volumes"):
        load_image(str(tmp_path / "x.png"), view=VolumeView(slice=1))
    with pytest.raises(DataError, match=r"bad volume view 'window=40,0'.*width > 0"):
        load_image(f"{path}#window=40,0")
    with_nan = ras_volume().astype(np.float32)
    with_nan[1, 1, 1] = np.nan
    shown = pixels(save(tmp_path / "nan.nii.gz", with_nan), slice=1)
    assert shown[0, X - 1] == 255 and shown[Y - 2, X - 2] == 0  # the NaN voxel black, the range from the others


def test_a_jsonl_entry_names_a_volume_and_its_slice_and_each_slice_has_its_own_cache_key(tmp_path):
    from medsynapse.model.encoders.cache import image_key

    save(tmp_path / "ct.nii.gz", ras_volume())
    record = {"id": "q1", "images": [{"path": "ct.nii.gz", "slice": 1, "window": [50, 100]},
                                     {"path": "ct.nii.gz", "axis": "coronal", "mip": [6, 7]}],
              "question": "Is there a lesion?", "answer": "yes", "answer_type": "yes_no"}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    sample = read_samples(tmp_path / "data.jsonl")[0]
    assert sample.images[0] == f"{tmp_path / 'ct.nii.gz'}#axis=axial&slice=1&window=50,100"  # one spelling
    assert np.asarray(load_image(sample.images[0]))[0, X - 1, 0] == 255
    assert load_image(sample.images[1]).size == (X, Z)
    assert image_key(sample.images[0]) != image_key(sample.images[1]) != image_key(str(tmp_path / "ct.nii.gz"))
    record["images"] = [{"path": "ct.nii.gz", "slab": 3}]
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, record 1 \(id 'q1'\), field 'images': unknown image-entry"):
        read_samples(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="applies to NIfTI volumes"):
        volume_entry({"path": "scan.png", "slice": 3}, "here")


def test_predict_answers_about_a_volume_slice_and_refuses_a_4d_file_in_one_line(tiny_env, tmp_path, capsys):
    from medsynapse.cli import main

    volume = save(tmp_path / "scan.nii.gz", ras_volume().astype(np.float32) * 10)
    assert main(["predict", "--model", str(tiny_env.vlm), "--image", volume, "--slice", "1", "--window", "40",
                 "400", "--question", "Is there a lesion?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()
    four_d = save(tmp_path / "series.nii.gz", np.zeros((4, 4, 4, 2), dtype=np.float32))
    assert main(["predict", "--model", str(tiny_env.vlm), "--image", four_d, "--question", "Is there a lesion?"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "4-D NIfTI" in error and "series.nii.gz" in error
    assert main(["predict", "--model", str(tiny_env.vlm), "--image", volume, "--slice", "2", "--mip", "1", "3",
                 "--question", "q"]) == 2
    assert "give one" in capsys.readouterr().err


def test_the_server_and_the_app_read_volumes_with_their_view(tmp_path):
    from medsynapse.app import load_scan
    from medsynapse.serve import BadRequest, ServeSettings, load_request_image

    volume = save(tmp_path / "ct.nii.gz", ras_volume())
    payload = base64.b64encode((tmp_path / "ct.nii.gz").read_bytes()).decode()
    settings = ServeSettings(allow_dirs=[str(tmp_path)])
    expected = np.asarray(load_image(volume, view=VolumeView(axis="coronal", slice=7)))
    got = load_request_image(f"data:application/gzip;base64,{payload}#axis=coronal&slice=7", "m", settings)
    assert np.array_equal(np.asarray(got), expected)
    assert np.array_equal(np.asarray(load_request_image(f"{volume}#axis=coronal&slice=7", "m", settings)), expected)
    with pytest.raises(BadRequest, match="slice 40 is outside") as refused:
        load_request_image(f"data:application/gzip;base64,{payload}#slice=40", "m", settings)
    assert "tmp" not in str(refused.value) and "the image" in str(refused.value)  # no server file names
    with pytest.raises(BadRequest, match="applies to NIfTI volumes"):
        load_request_image(f"data:image/png;base64,{payload}#slice=1", "m", settings)
    assert np.array_equal(np.asarray(load_scan(volume, "custom", 50, 100, "axial", 1)),
                          np.asarray(load_image(volume, view=VolumeView(slice=1, window=(50.0, 100.0)))))
    assert np.array_equal(np.asarray(load_scan(volume, "as stored", 0, 1, "axial", -1)),
                          np.asarray(load_image(volume)))  # -1: the middle slice


def header_only(path, shape: tuple[int, ...]) -> str:
    """A NIfTI file whose header promises `shape` (uint8, RAS+ axes) and holds no voxels: only the header is read
    before the plane check."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), 1)
    header.set_qform(np.eye(4), 1)
    header["vox_offset"] = 352
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4)
    return str(path)


def test_a_plane_one_voxel_past_8192_squared_is_refused_before_any_voxel_is_read(tmp_path):
    past = header_only(tmp_path / "past.nii", (8192, 8193, 1))
    with pytest.raises(DataError, match=r"past.nii: a axial plane of 67117056 voxels, more than 67108864"):
        load_image(past)
    at_limit = header_only(tmp_path / "at.nii", (8192, 8192, 1))  # allowed: it goes on to read (and finds no data)
    with pytest.raises(DataError, match=r"at.nii: cannot read the volume's voxels"):
        load_image(at_limit)
