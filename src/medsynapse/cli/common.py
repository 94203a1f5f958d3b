"""Helpers several command groups share: a model folder's bases (--vlm / --encoder), a NIfTI view, benchmark source
options."""

from __future__ import annotations

import argparse
from pathlib import Path


def base_folders(args: argparse.Namespace):
    """`--vlm DIR` / `--encoder DIR`: the model folder's bases given explicitly (model/bases.py)."""
    from medsynapse.model.bases import BaseFolders

    return BaseFolders(vlm=args.vlm, encoder=args.encoder)


def add_base_options(parser: argparse.ArgumentParser) -> None:
    """--vlm / --encoder on a command that loads a saved model folder."""
    parser.add_argument("--vlm", default=None, metavar="DIR",
                        help="the model folder's base VLM, when it is not found by itself (searched: "
                             "$MEDSYNAPSE_CACHE/NAME, NAME next to the model folder, the path recorded relative to "
                             "it); must hold the content recorded in medsynapse.json")
    parser.add_argument("--encoder", default=None, metavar="DIR",
                        help="the model folder's prior encoder, likewise (a student folder has none)")


def volume_view(args: argparse.Namespace):
    """`--slice / --axis / --mip` as a NIfTI view (None when none is given); refused for a 2-D image."""
    from medsynapse.data.images import VolumeView, is_nifti

    if args.slice is None and args.mip is None and args.axis is None:
        return None
    if not is_nifti(args.image):
        raise ValueError(f"{args.image}: --slice, --axis and --mip choose an image of a NIfTI volume (.nii, .nii.gz)")
    if args.slice is not None and args.mip is not None:
        raise ValueError("--slice and --mip: give one (a slice, or the maximum-intensity projection over a range)")
    return VolumeView(axis=args.axis or "axial", slice=args.slice, mip=tuple(args.mip) if args.mip else None)


def parse_source_options(items: list[str], names: list[str]) -> dict[str, dict]:
    """`BENCHMARK.KEY=VALUE` loader options (values parsed as YAML scalars/lists), e.g. pmc-vqa.file=test.csv."""
    import yaml

    options: dict[str, dict] = {}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or name not in names:
            raise SystemExit(f"--option {item!r}: expected BENCHMARK.KEY=VALUE with BENCHMARK one of {names}")
        options.setdefault(name, {})[key] = yaml.safe_load(value)
    return options


def add_source_paths(options: dict[str, dict], items: list[str], names: list[str]) -> dict[str, dict]:
    """`--path BENCHMARK=DIR`: read BENCHMARK from DIR (any folder) instead of its folder under --data-root."""
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or name not in names or not folder:
            raise SystemExit(f"--path {item!r}: expected BENCHMARK=DIR with BENCHMARK one of {names}")
        options.setdefault(name, {})["folder"] = folder
    return options


def is_run_file(path: str) -> bool:
    from medsynapse.config import read_yaml
    from medsynapse.runconfig import is_run_config

    return Path(path).is_file() and is_run_config(read_yaml(Path(path)))
