"""`convert`, `fixtures` and `cache-features`: data preparation."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsynapse.cli.common import add_source_paths, parse_source_options


def cmd_fixtures(args: argparse.Namespace) -> int:
    from medsynapse.data.sources.fixtures import write_fixtures

    print(f"fixture layouts of every supported dataset written under {write_fixtures(args.out)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from medsynapse.data.schema import write_samples
    from medsynapse.data.sources import load_source

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = parse_source_options([f"{args.source}.{o}" for o in args.option or []], [args.source])
    if args.path:
        options = add_source_paths(options, [f"{args.source}={args.path}"], [args.source])
    bench = load_source(args.source, args.data_root, out.parent / "images", skip_bad=args.skip_bad,
                        **options.get(args.source, {}))
    write_samples(out, bench.samples)
    print(f"{len(bench.samples)} samples from {bench.source} ({bench.closed_definition}) written to {out}; "
          f"excluded {bench.excluded}; skipped {len(bench.skipped)} bad records")
    for item in bench.skipped:
        print(f"  skipped {item['id']}: {item['error']}")
    return 0


def cmd_cache_features(args: argparse.Namespace) -> int:
    from medsynapse.recipes.priors import cache_features

    count = cache_features(args.encoder, args.data, args.out)
    print(f"prior features for {count} images cached under {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from medsynapse.data.sources import SOURCES

    convert = sub.add_parser("convert", parents=[common],
                             help="turn a training corpus (or any benchmark) into a MedSynapse JSONL file")
    convert.add_argument("--source", required=True, choices=list(SOURCES), help="the public dataset's layout to read")
    convert.add_argument("--data-root", default=".", help="folder holding the dataset as published")
    convert.add_argument("--path", default=None, metavar="DIR", help="read the source from DIR instead of its "
                         "folder under --data-root")
    convert.add_argument("--out", required=True, help="output .jsonl; embedded images go to its folder's images/")
    convert.add_argument("--skip-bad", action="store_true", help="skip bad records/images (counted and listed)")
    convert.add_argument("--option", action="append", metavar="KEY=VALUE",
                         help="loader option, e.g. balance=true, per_modality=2000, "
                              "modalities=[Computed Tomography, Microscopy]")
    convert.set_defaults(func=cmd_convert)

    fixtures = sub.add_parser("fixtures", parents=[common],
                             help="write tiny copies of every supported dataset layout (for trying eval)")
    fixtures.add_argument("--out", required=True, help="folder for the tiny datasets in each public layout")
    fixtures.set_defaults(func=cmd_fixtures)

    cache = sub.add_parser("cache-features", parents=[common],
                             help="precompute frozen prior-encoder features into safetensors shards")
    cache.add_argument("--encoder", required=True, help="prior-encoder folder")
    cache.add_argument("--data", required=True, help="a JSON-lines sample file")
    cache.add_argument("--out", required=True, help="cache root; recipes read it with prior_cache: DIR")
    cache.set_defaults(func=cmd_cache_features)
