"""Image loading with errors that name the file and the record."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from medsynapse.data.schema import DataError, Sample

DICOM_SUFFIXES = (".dcm", ".dicom")


def file_window(ds) -> tuple[float, float] | None:
    """The file's own (WindowCenter, WindowWidth), the first pair when several are listed; None if it has none."""
    from pydicom.multival import MultiValue

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(value) -> float:
        return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)

    return first(ds.WindowCenter), first(ds.WindowWidth)


def check_window(window: tuple[float, float], where: str) -> tuple[float, float]:
    import math

    center, width = (float(v) for v in window)
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(f"{where}: window (center {center}, width {width}) needs a finite center and a width > 0")
    return center, width


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
    pixels = ds.pixel_array
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
               window: tuple[float, float] | None = None) -> Image.Image:
    """Open an image fully (so corruption shows here, not deep inside a batch) as RGB; DICOM is windowed."""
    where = f"record id {sample.id!r}, field '{field}'" if sample is not None else "image"
    if window is not None:
        window = check_window(window, "--window")  # the caller's setting, not the file's fault
    if str(path).lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path):
        try:
            return load_dicom(path, window)
        except FileNotFoundError:
            raise DataError(f"{path}: image not found ({where})") from None
        except Exception as err:  # pydicom raises many types for bad files
            raise DataError(f"{path}: corrupt or unreadable DICOM ({where}): {err}") from None
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found ({where})") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image too large ({where}): {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({where}): {err}") from None


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
