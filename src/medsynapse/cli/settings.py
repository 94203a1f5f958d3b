"""`config show` and `inspect`: what a run file resolves to and what it builds."""

from __future__ import annotations

import argparse
import json

from medsynapse.cli.common import is_run_file


def cmd_config_show(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from medsynapse.runconfig import read_run_config, show

    run = read_run_config(args.file, args.set)
    resolved = show(run)
    if run.synthmed:  # the demo's SynthMed settings, its defaults included
        from medsynapse.demo import demo_settings

        resolved["synthmed"] = asdict(demo_settings(run))
    print(json.dumps(resolved, indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from medsynapse.config import load_config
    from medsynapse.inspection import RealSizeConfig, from_run, main

    if is_run_file(args.config):
        from medsynapse.runconfig import read_run_config

        config = from_run(read_run_config(args.config, args.set))
    else:
        config = load_config(RealSizeConfig, args.config, args.set)
    print(main(config, as_json=args.json))
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    config = sub.add_parser("config", parents=[common], help="show a run config's fully resolved settings")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_show = config_sub.add_parser("show", parents=[common],
                                        help="every stage's settings as the recipes will run them, as JSON")
    config_show.add_argument("file")
    config_show.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="e.g. stage2.lr=1e-5 model.lora_r=8")
    config_show.set_defaults(func=cmd_config_show)

    inspect = sub.add_parser("inspect", parents=[common],
                             help="parameter counts and training memory of a real-size config (meta device)")
    inspect.add_argument("--config", required=True)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    inspect.set_defaults(func=cmd_inspect)
