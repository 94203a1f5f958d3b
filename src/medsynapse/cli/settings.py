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
        from medsynapse.steps.synthmed import demo_settings

        resolved["synthmed"] = asdict(demo_settings(run))
    print(explain(resolved) if args.explain else json.dumps(resolved, indent=2))
    return 0


def section_classes() -> dict[str, type]:
    """The config class each section of `runconfig.show`'s output is an instance of."""
    from medsynapse.recipes.registry import RECIPES
    from medsynapse.runconfig import DataSection, EvalSection, ModelSection
    from medsynapse.steps.synthmed import DemoConfig

    classes: dict[str, type] = {"model": ModelSection, "data": DataSection, "eval": EvalSection,
                                "synthmed": DemoConfig}
    classes.update({name: recipe.config_class() for name, recipe in RECIPES.items() if recipe.kind == "stage"})
    classes.update({f"baselines.{name}": recipe.config_class() for name, recipe in RECIPES.items()
                    if recipe.kind == "baseline"})
    return classes


def explain(resolved: dict) -> str:
    """Every resolved value as `section.key: value  # meaning` (the meaning from the config class: its `help`
    metadata or its comments, config_fields.describe_fields), one section after another."""
    from medsynapse.config_fields import describe_fields

    classes = section_classes()
    sections: dict[str, dict] = {}
    for name, values in resolved.items():
        if name == "baselines":
            sections.update({f"baselines.{method}": v for method, v in values.items()})
        elif name != "output":
            sections[name] = values
    lines = ["# output", f"output: {json.dumps(resolved['output'])}  # where every stage's folder goes", ""]
    for name, values in sections.items():
        rows = {row["key"]: row for row in describe_fields(classes[name])}
        lines.append(f"# {name} ({classes[name].__name__})")
        for key, value in values.items():
            row = rows[key]
            choices = " | ".join(json.dumps(choice) for choice in row["choices"])
            note = "; ".join(part for part in (row["meaning"], choices and f"one of {choices}") if part)
            lines.append(f"{name}.{key}: {json.dumps(value)}" + (f"  # {note}" if note else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


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
    config_show.add_argument("file", help="a run file (in this folder or shipped with the package)")
    config_show.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="e.g. stage2.lr=1e-5 model.lora_r=8")
    config_show.add_argument("--explain", action="store_true",
                             help="one line per key, `section.key: value  # what it means` (its choices too)")
    config_show.set_defaults(func=cmd_config_show)

    inspect = sub.add_parser("inspect", parents=[common],
                             help="parameter counts and training memory of a real-size config (meta device)")
    inspect.add_argument("--config", required=True, help="a run file naming a real-size model")
    inspect.add_argument("--json", action="store_true", help="the counts and estimates as JSON")
    inspect.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="e.g. model.n_memory=16 stage2.batch_size=4")
    inspect.set_defaults(func=cmd_inspect)
