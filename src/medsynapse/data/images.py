"""Image loading with errors that name the file and the record."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from PIL import Image, UnidentifiedImageError

from medsynapse.data.errors import DataError
from medsynapse.data.schema import Sample
from medsynapse.data.views import (
    VolumeView,
    check_window,
    is_nifti,
    parse_view,
    split_view,
)

DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_PLANE_PIXELS = 2**26  # a 2-D image of a volume larger than this is refused (8192 x 8192)
_VIEW_RAS_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def load_nifti(path: str, view: VolumeView | None = None) -> Image.Image:
    """One 2-D image of a NIfTI volume as 8-bit RGB, in the radiological convention.

    The slice (or the maximum-intensity projection over a range of slices) is read from the file's voxel grid
    without loading the rest of the volume, then reoriented by the affine (nibabel's `io_orientation`: the RAS+ axis
    nearest to each voxel axis): axial and coronal images show the patient's right on the image's left and
    anterior / superior at the top, sagittal ones anterior on the left and superior at the top, as DICOM viewers show
    them. Voxels that are not square in the image plane are resampled to their physical aspect. Window: `view.window`,
    else the header's display range (cal_min, cal_max) when set, else the image's own value range. A 4-D file (a time
    series or several volumes) is refused: which volume to show is the user's choice.
    """
    import nibabel as nib
    import numpy as np

    view = view or VolumeView()
    image: Any = nib.load(path)  # a NIfTI image; nibabel types `load` as its FileBasedImage base (no shape or affine)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) > 4 or (len(shape) == 4 and shape[3] > 1):
        raise DataError(f"{path}: a {len(shape)}-D NIfTI volume of shape {shape} (a time series or several volumes); "
                        "MedSynapse reads 3-D volumes: extract one first (e.g. fslroi, or nibabel's "
                        "image.slicer[..., t])")
    if len(shape) < 2:
        raise DataError(f"{path}: a NIfTI file of shape {shape} holds no image")
    spatial = shape[:3] if len(shape) >= 3 else (*shape, 1)
    orientation = nib.orientations.io_orientation(image.affine)  # per voxel axis: (RAS+ axis, +1 / -1)
    target = _VIEW_RAS_AXIS[view.axis]
    if not np.isin(target, orientation[:, 0]):
        raise DataError(f"{path}: the affine does not say which voxel axis runs {view.axis} (degenerate affine "
                        f"{image.affine.tolist()})")
    voxel_axis = int(np.flatnonzero(orientation[:, 0] == target)[0])
    if len(shape) == 2 and voxel_axis != 2:
        raise DataError(f"{path}: a 2-D NIfTI image has no {view.axis} view (it is one slice)")
    count = spatial[voxel_axis]
    plane_pixels = math.prod(n for axis, n in enumerate(spatial) if axis != voxel_axis)
    if plane_pixels > MAX_PLANE_PIXELS:
        raise DataError(f"{path}: a {view.axis} plane of {plane_pixels} voxels, more than {MAX_PLANE_PIXELS}")
    if view.mip is not None:
        first, last = view.mip
        if not 0 <= first <= last < count:
            raise DataError(f"{path}: mip range {first}..{last} is outside the volume's {count} {view.axis} slices "
                            f"(0..{count - 1}, along voxel axis {voxel_axis})")
        chosen = range(first, last + 1)
    else:
        index = count // 2 if view.slice is None else view.slice
        if not 0 <= index < count:
            raise DataError(f"{path}: slice {index} is outside the volume's {count} {view.axis} slices "
                            f"(0..{count - 1}, along voxel axis {voxel_axis})")
        chosen = range(index, index + 1)
    plane = None
    for number in chosen:  # one slice at a time: a projection never holds its whole range
        part = _read_slice(image, shape, voxel_axis, number, path)
        plane = part if plane is None else np.fmax(plane, part)  # the maximum-intensity projection
    assert plane is not None  # `chosen` is never empty
    rest = [axis for axis in range(3) if axis != voxel_axis]  # the plane's voxel axes, in file order
    for position, axis in enumerate(rest):  # increasing index = increasing RAS+ coordinate
        if orientation[axis, 1] < 0:
            plane = np.flip(plane, axis=position)
    if orientation[rest[0], 0] > orientation[rest[1], 0]:  # plane axes in RAS+ order
        plane, rest = plane.T, rest[::-1]
    shown = np.ascontiguousarray(plane[::-1, ::-1].T)  # rows: 2nd RAS+ axis descending; columns: 1st descending
    zooms = [float(z) for z in image.header.get_zooms()[:3]] + [1.0] * (3 - len(image.header.get_zooms()[:3]))
    row_mm, column_mm = zooms[rest[1]], zooms[rest[0]]
    low, high = _volume_window(image, view, shown, path)
    scaled = np.nan_to_num(np.clip((shown - low) / max(high - low, 1e-6), 0.0, 1.0), nan=0.0)  # NaN voxels: black
    picture = Image.fromarray((scaled * 255).round().astype(np.uint8))
    if row_mm > 0 and column_mm > 0 and abs(row_mm / column_mm - 1) > 0.01:  # physical aspect
        finest = min(row_mm, column_mm)
        size = (round(picture.width * column_mm / finest), round(picture.height * row_mm / finest))
        if size[0] * size[1] > MAX_PLANE_PIXELS:
            raise DataError(f"{path}: voxel sizes {row_mm:g} x {column_mm:g} mm would make a {size[0]}x{size[1]} "
                            "image; check the header's pixdim")
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    return picture.convert("RGB")


def _read_slice(image, shape: tuple[int, ...], voxel_axis: int, number: int, path: str):
    """Voxel slice `number` along `voxel_axis`, as float64 (the file's scaling applied); only that slice is read."""
    import numpy as np

    try:
        if len(shape) == 2:  # one slice stored as a 2-D image
            return np.asarray(image.dataobj, dtype=np.float64)
        where: list = [slice(None)] * 3
        where[voxel_axis] = number
        return np.asarray(image.dataobj[(*where, *[0] * (len(shape) - 3))], dtype=np.float64)  # 4-D: volume 0
    except (OSError, ValueError, EOFError) as err:  # a truncated or damaged file shows here
        raise DataError(f"{path}: cannot read the volume's voxels ({err})") from None


def _volume_window(image, view: VolumeView, plane, path: str) -> tuple[float, float]:
    if view.window is not None:
        center, width = check_window(view.window, path)
        return center - width / 2, center + width / 2
    cal_min, cal_max = (float(image.header.get(k, 0) or 0) for k in ("cal_min", "cal_max"))
    if cal_max > cal_min:
        return cal_min, cal_max
    import numpy as np

    finite = plane[np.isfinite(plane)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def file_window(ds) -> tuple[float, float] | None:
    """The file's own (WindowCenter, WindowWidth), the first pair when several are listed; None if it has none."""
    from pydicom.multival import MultiValue

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(value) -> float:
        return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)

    return first(ds.WindowCenter), first(ds.WindowWidth)


# JPEG Baseline (Process 1) and JPEG Extended (Processes 2 and 4: 8 and 12 bits): sequential DCT
SEQUENTIAL_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


class UndecodableDicom(DataError):
    """Compressed pixel data that no installed decoder reads (the message says which tried and why)."""


def dicom_pixels(ds, path: str):
    """`ds.pixel_array`; a sequential JPEG that the decoders refuse only for its scan header's progressive-mode
    fields is read as IJG libjpeg (GDCM's and DCMTK's decoder) reads it (`sequential_scan_fixed`); pixel data that
    no decoder reads is one UndecodableDicom naming the file, its transfer syntax and each decoder's reason."""
    try:
        return ds.pixel_array
    except Exception as err:  # pydicom raises RuntimeError / ValueError / NotImplementedError per plugin
        first = err
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and str(syntax) in SEQUENTIAL_JPEG and _repair_sequential_scans(ds):
        try:
            return ds.pixel_array
        except Exception:  # the first error says more
            pass
    if syntax is None or not syntax.is_compressed:
        raise first
    reasons = "; ".join(line.strip(" -") for line in str(first).splitlines()[1:] if line.strip()) or str(first)
    raise UndecodableDicom(f"{path}: its {syntax.name} pixel data cannot be decoded by the installed decoders "
                           f"({reasons}); the file's compressed stream is damaged or uses an unsupported variant")


def _repair_sequential_scans(ds) -> bool:
    """Rewrite each frame of a sequential-JPEG dataset with `sequential_scan_fixed`; whether any frame changed."""
    from pydicom.encaps import encapsulate, generate_frames

    frames = list(generate_frames(ds.PixelData, number_of_frames=int(getattr(ds, "NumberOfFrames", 1) or 1)))
    fixed = [sequential_scan_fixed(frame) for frame in frames]
    if fixed == frames:
        return False
    ds.PixelData = encapsulate(fixed)
    return True


def sequential_scan_fixed(data: bytes) -> bytes:
    """A baseline / extended sequential JPEG (SOF0 / SOF1) whose start-of-scan headers carry spectral selection or
    successive approximation other than Ss 0, Se 63, Ah 0, Al 0 (fields only progressive JPEG uses) with those
    values; anything else (progressive, lossless, not JPEG, nothing to fix) unchanged.

    IJG libjpeg, the decoder of GDCM and DCMTK, reads such scans as full sequential scans after a warning ("Invalid
    SOS parameters for sequential JPEG"); libjpeg (pylibjpeg's) refuses them. pydicom's JPEG-lossy.dcm (NEMA's
    NM1_JPLY, 12-bit) has Se 0; with Se 63 it is byte for byte its fixed copy JPGExtended.dcm.
    """
    if data[:2] != b"\xff\xd8":
        return data
    out, i, sequential = bytearray(data), 2, False
    while i + 4 <= len(out):
        if out[i] != 0xFF:
            return data  # not at a marker: not a stream this reads
        marker = out[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(out[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1):
            sequential = True
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # progressive, lossless, arithmetic
            return data
        if marker == 0xDA:  # start of scan: Ns, Ns x (id, tables), Ss, Se, Ah/Al; then entropy-coded data
            if not sequential:
                return data
            fields = i + 5 + 2 * out[i + 4]
            out[fields:fields + 3] = bytes([0, 63, 0])
            i += 2 + length
            while i + 1 < len(out) and not (out[i] == 0xFF and out[i + 1] not in (0x00, 0xFF)
                                            and not 0xD0 <= out[i + 1] <= 0xD7):
                i += 1  # to the next marker (0xFF00 is a stuffed byte, 0xFFD0-7 restart markers)
            continue
        i += 2 + length
    return bytes(out) if out != data else data


def load_dicom(path: str, window: tuple[float, float] | None = None) -> Image.Image:
    """A DICOM slice as 8-bit RGB: modality LUT (rescale slope/intercept to e.g. Hounsfield units), then windowing.

    Window: `window=(center, width)` if given, else the file's own WindowCenter / WindowWidth (the first pair), else
    its VOI LUT table (scaled by the table's output range), else the pixel range. A window maps
    [center − width/2, center + width/2] linearly to [0, 255] and clips outside it, so a slice whose values all lie
    inside the window keeps its place in the grey scale (it is not stretched to black-white). MONOCHROME1 (inverted
    grey) is flipped so that dense is bright, as in MONOCHROME2.
    """
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    pixels = dicom_pixels(ds, path)
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame series: the middle frame
    if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut  # indices into the file's colour table: look the colours up

        colours = apply_color_lut(pixels, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(scale_to_8bit(colours, bits)).convert("RGB")
    if getattr(ds, "SamplesPerPixel", 1) == 3:
        if pixels.ndim == 4:  # multi-frame colour: the middle frame
            pixels = pixels[pixels.shape[0] // 2]
        # (pydicom's pixel_array already converts YBR colour to RGB)
        bits = int(getattr(ds, "BitsStored", 8) or 8)  # 16-bit colour keeps its range (not wrapped modulo 256)
        return Image.fromarray(scale_to_8bit(pixels, bits)).convert("RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    window = window if window is not None else file_window(ds)
    if window is not None:
        center, width = check_window(window, path)
        low, high = center - width / 2, center + width / 2
    elif "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(values.min()), float(values.max())
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")


DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the dataset is one deflate stream
_INFLATE_STEP = 2**20


class TooLarge(DataError):
    """A compressed file that inflates past the caller's bound (a decompression bomb), refused before it is decoded
    whole."""


def check_inflated_size(path: str, limit: int) -> int | None:
    """The inflated size of a gzip file (a `.nii.gz` volume, every gzip member) or of a Deflated DICOM's dataset,
    counted 1 MiB at a time without keeping it; TooLarge as soon as the count passes `limit` bytes (so a small upload
    that inflates to gigabytes costs `limit` bytes of inflating, not gigabytes of memory). None when the file is
    neither (nothing inflates) or is damaged (the loader then names what is wrong)."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as handle:
            if handle.read(2) == b"\x1f\x8b":
                handle.seek(0)
                with gzip.GzipFile(fileobj=handle) as stream:
                    return _count_inflated(iter(lambda: stream.read(_INFLATE_STEP), b""), limit, path)
            handle.seek(0)
            if not (path.lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)) or not _deflated_dicom(handle):
                return None
            return _count_inflated(_raw_inflate(handle), limit, path)
    except (OSError, EOFError, zlib.error):
        return None


def _deflated_dicom(handle) -> bool:
    """Whether the DICOM file's meta group names the Deflated transfer syntax; `handle` is left at the dataset (the
    deflate stream's start), as pydicom leaves it before inflating."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(handle, force=True)
        meta = _read_file_meta_info(handle)
    except Exception:  # pydicom raises many types for what is not DICOM
        return False
    return str(meta.get("TransferSyntaxUID", "")) == DEFLATED_DICOM


def _raw_inflate(handle):
    """The inflated pieces (at most 1 MiB each) of the raw deflate stream from `handle`'s position on."""
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while chunk := handle.read(_INFLATE_STEP):
        while chunk:
            yield inflater.decompress(chunk, _INFLATE_STEP)
            chunk = inflater.unconsumed_tail
        if inflater.eof:
            return


def _count_inflated(pieces, limit: int, path: str) -> int:
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > limit:
            raise TooLarge(f"{path}: inflates to more than {limit} bytes (a compressed file is inflated at most to "
                           "that size)")
    return total


def has_dicom_preamble(path: str) -> bool:
    """A DICOM file whatever its name (hospital exports often have no extension): "DICM" after the 128-byte
    preamble."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def load_image(path: str, sample: Sample | None = None, field: str = "images",
               window: tuple[float, float] | None = None, view: VolumeView | None = None) -> Image.Image:
    """Open an image fully (so corruption shows here, not deep inside a batch) as RGB; DICOM is windowed. A NIfTI
    volume (`.nii`, `.nii.gz`) gives the slice its path names (`ct.nii.gz#slice=40&axis=axial`) or `view`
    (`load_nifti`; a given `view` replaces the path's); `window` then overrides the view's."""
    where = f"record id {sample.id!r}, field '{field}'" if sample is not None else "image"
    if window is not None:
        window = check_window(window, "--window")  # the caller's setting, not the file's fault
    if is_nifti(path):
        file, fragment = split_view(path)
        chosen = view or parse_view(fragment, f"{file} ({where})")
        if window is not None:
            chosen = dataclasses.replace(chosen, window=window)
        try:
            return load_nifti(file, chosen)
        except DataError as err:
            raise DataError(f"{err} ({where})") from None
        except FileNotFoundError:
            raise DataError(f"{file}: image not found ({where})") from None
        except Exception as err:  # nibabel raises several types for files that are not NIfTI or are damaged
            raise DataError(f"{file}: corrupt or unreadable NIfTI ({where}): {err}") from None
    if view is not None:
        raise DataError(f"{path}: a volume view (slice, axis, mip) applies to NIfTI volumes ({where})")
    if str(path).lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path):
        try:
            return load_dicom(path, window)
        except FileNotFoundError:
            raise DataError(f"{path}: image not found ({where})") from None
        except UndecodableDicom as err:
            raise UndecodableDicom(f"{err} ({where})") from None
        except Exception as err:  # pydicom raises many types for bad files
            raise DataError(f"{path}: corrupt or unreadable DICOM ({where}): {err}") from None
    return open_picture(path, path, where)


def open_picture(source, name: str, where: str = "image") -> Image.Image:
    """A PNG / JPEG / other PIL image from a path or a binary file object (a server's decoded upload, no temporary
    file), decoded fully and as RGB; errors name `name` and `where`."""
    try:
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{name}: image not found ({where})") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{name}: image too large ({where}): {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{name}: corrupt or unreadable image ({where}): {err}") from None


def significant_bits(values) -> int:
    """Bits needed for the largest value (at least 8): 12-bit scans stored in 16-bit files use 0-4095."""
    import numpy as np

    top = int(np.max(values)) if np.size(values) else 0
    return max(8, top.bit_length())


def scale_to_8bit(values, bits: int):
    """Integer samples of `bits` significant bits to uint8 over their full range."""
    import numpy as np

    scaled = np.asarray(values, dtype=np.float64) * (255.0 / (2**bits - 1))
    return np.clip(scaled.round(), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without losing range: PIL's own conversion clips 16-bit grey ("I;16", "I") at 255 and maps floats
    ("F") without scaling, so those are scaled here, integers by their significant bit depth (inferred from the
    largest value, as PNG readers do when no sBIT chunk is given) and floats by their min-max range."""
    import numpy as np

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.int64).clip(min=0)
        return Image.fromarray(scale_to_8bit(values, significant_bits(values))).convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / max(high - low, 1e-12) * 255
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_mask(path: str, sample: Sample | None = None) -> Image.Image:
    """A binary segmentation mask as an 8-bit grayscale image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as err:
        rid = sample.id if sample is not None else "?"
        raise DataError(f"{path}: missing or corrupt mask (record id {rid!r}, field 'mask'): {err}") from None
