"""Image loading with errors that name the file and the record."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from medsynapse.data.schema import DataError, Sample


def load_image(path: str, sample: Sample | None = None, field: str = "images") -> Image.Image:
    """Open an image fully (so corruption shows here, not deep inside a batch) as RGB."""
    where = f"record id {sample.id!r}, field '{field}'" if sample is not None else "image"
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found ({where})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({where}): {err}") from None


def load_mask(path: str, sample: Sample | None = None) -> Image.Image:
    """A binary segmentation mask as an 8-bit grayscale image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as err:
        rid = sample.id if sample is not None else "?"
        raise DataError(f"{path}: missing or corrupt mask (record id {rid!r}, field 'mask'): {err}") from None
