"""The command-line reference, `docs/cli.md`, written from the parsers themselves so that it cannot drift from
them: `python -m medsynapse.cli.reference > docs/cli.md`. `tests/test_cli_reference.py` fails when the file is
stale or when an option has no help text.

Plan: walk the parser tree (a command, then its subcommands), and for each command write its help line and a
table of its options: how it is typed, its default, what it does.

argparse has no public way to list a parser's actions or a subcommand's help, so `_actions` and
`_choices_actions` are read (stable since Python 3.2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

HEADER = """# Command-line reference

Every command and option of `medsynapse`, written from the parsers (`python -m medsynapse.cli.reference >
docs/cli.md`; a test fails when this file is stale). `medsynapse COMMAND --help` prints the same. Every command
also takes `--debug` (on an error, the full traceback instead of one line naming what is wrong).
"""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(command words, help line, parser) for every command that runs something, depth first in declared order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if _has_subcommands(subparser):
                    yield from commands(subparser, (*path, name))
                else:
                    yield (*path, name), helps.get(name, ""), subparser


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a user types, in declared order: no --help, no --debug (every command takes it)."""
    return [action for action in parser._actions
            if not isinstance(action, argparse._HelpAction) and "--debug" not in action.option_strings]


def invocation(action: argparse.Action) -> str:
    """How the option is typed, as `--help` shows it: `--window CENTER WIDTH`, `--set [KEY=VALUE ...]`."""
    metavar = action.metavar if action.metavar is not None else (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else
        action.dest if not action.option_strings else action.dest.upper())
    names = list(metavar) if isinstance(metavar, tuple) else [metavar]
    nargs = action.nargs
    if nargs == 0:
        values = ""
    elif isinstance(nargs, int):
        values = " ".join(names[i % len(names)] for i in range(nargs))
    elif nargs == "?":
        values = f"[{names[0]}]"
    elif nargs == "*":
        values = f"[{names[0]} ...]"
    elif nargs == "+":
        values = f"{names[0]} [{names[0]} ...]"
    else:
        values = names[0]
    if not action.option_strings:
        return values
    return ", ".join(f"{flag} {values}".strip() for flag in action.option_strings)


def default_text(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
        return ""
    return f"`{action.default}`"


def markdown(parser: argparse.ArgumentParser) -> str:
    lines = [HEADER]
    for words, help_line, subparser in commands(parser):
        lines += [f"## `medsynapse {' '.join(words)}`", "", help_line, "",
                  "| option | default | what it does |", "|---|---|---|"]
        for action in options(subparser):
            text = (action.help or "").replace("%%", "%").replace("|", "\\|")
            lines.append(f"| `{invocation(action)}` | {default_text(action)} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    from medsynapse.cli import build_parser

    sys.stdout.write(markdown(build_parser()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
