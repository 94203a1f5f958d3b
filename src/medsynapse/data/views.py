"""How a data record names one 2-D image of a NIfTI volume: `ct.nii.gz#axis=axial&slice=40` (or a JSONL entry
{"path": "ct.nii.gz", "slice": 40}), parsed and checked here, with no image library, so that the record schema can
check a record's views without importing the loaders (data/images.py reads the pixels)."""

from __future__ import annotations

from dataclasses import dataclass

from medsynapse.data.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VIEW_AXES = ("axial", "coronal", "sagittal")  # the RAS+ axis each view's slices are taken along: z, y, x


@dataclass(frozen=True)
class VolumeView:
    """Which 2-D image of a NIfTI volume to show: slices along `axis` (axial, coronal or sagittal, whatever the
    file's voxel order), the `slice` (a voxel index along the file axis nearest to that direction, as viewers number
    them; None: the middle one) or a maximum-intensity projection over the slices `mip` = (first, last), inclusive.
    `window` (center, width) in the volume's stored units (CT: Hounsfield units after the file's scaling)."""

    axis: str = "axial"
    slice: int | None = None
    mip: tuple[int, int] | None = None
    window: tuple[float, float] | None = None

    def spec(self) -> str:
        """The view as a path fragment (`ct.nii.gz#axis=axial&slice=40`): how a sample names a volume's image."""
        parts = [f"axis={self.axis}"]
        if self.slice is not None:
            parts.append(f"slice={self.slice}")
        if self.mip is not None:
            parts.append(f"mip={self.mip[0]},{self.mip[1]}")
        if self.window is not None:
            parts.append(f"window={self.window[0]:g},{self.window[1]:g}")
        return "&".join(parts)


def is_nifti(path: str) -> bool:
    return split_view(path)[0].lower().endswith(NIFTI_SUFFIXES)


def split_view(path: str) -> tuple[str, str]:
    """(file, view fragment): `ct.nii.gz#slice=40` -> ("ct.nii.gz", "slice=40"); other paths keep any '#'."""
    file, sep, fragment = str(path).rpartition("#")
    if sep and file.lower().endswith(NIFTI_SUFFIXES):
        return file, fragment
    return str(path), ""


def parse_view(fragment: str, where: str = "image") -> VolumeView:
    """A view fragment (`axis=coronal&slice=40&window=40,400`, `mip=30,50`) -> VolumeView; a bad one names itself."""
    values: dict = {}
    for part in filter(None, fragment.split("&")):
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError("expected KEY=VALUE")
            if key == "axis":
                if value not in VIEW_AXES:
                    raise ValueError(f"axis must be one of {VIEW_AXES}")
                values["axis"] = value
            elif key == "slice":
                values["slice"] = int(value)
            elif key in ("mip", "window"):
                first, second = (float(v) for v in value.split(","))
                values[key] = (int(first), int(second)) if key == "mip" else check_window((first, second), where)
            else:
                raise ValueError("known keys: axis, slice, mip, window")
        except ValueError as err:
            raise DataError(f"{where}: bad volume view {part!r} ({err})") from None
    if "slice" in values and "mip" in values:
        raise DataError(f"{where}: a volume view takes a slice or a mip range, not both")
    return VolumeView(**values)


def volume_entry(entry: object, where: str) -> str:
    """A JSONL image entry naming a volume and its view, {"path": "ct.nii.gz", "slice": 40, "axis": "axial",
    "mip": [30, 50], "window": [40, 400]}, as the path string every loader reads (`ct.nii.gz#axis=axial&slice=40`)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise DataError(f"{where}: an image entry is a path, or an object with a 'path' (a NIfTI volume) and its view")
    unknown = set(entry) - {"path", "axis", "slice", "mip", "window"}
    if unknown:
        raise DataError(f"{where}: unknown image-entry key(s) {sorted(unknown)}")
    if not entry["path"].lower().endswith(NIFTI_SUFFIXES):
        raise DataError(f"{where}: {entry['path']!r}: a view (slice, axis, mip, window) applies to NIfTI volumes "
                        f"({', '.join(NIFTI_SUFFIXES)})")
    fragment = "&".join(f"{k}={','.join(str(x) for x in v) if isinstance(v, list) else v}"
                        for k, v in entry.items() if k != "path")
    # checked here, so a bad view names the record; one spelling per view (one cache entry per slice)
    return f"{entry['path']}#{parse_view(fragment, where).spec()}"


def check_window(window: tuple[float, float], where: str) -> tuple[float, float]:
    import math

    center, width = (float(v) for v in window)
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(f"{where}: window (center {center}, width {width}) needs a finite center and a width > 0")
    return center, width
