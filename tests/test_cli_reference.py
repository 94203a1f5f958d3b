"""docs/cli.md is the parsers' own reference: stale docs, an option without help, a changed default or a mangled
metavar fail here (`python -m medsynapse.cli.reference > docs/cli.md` rewrites it after a deliberate change)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsynapse.cli import build_parser
from medsynapse.cli.reference import commands, invocation, markdown, options

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_what_the_parsers_say():
    assert DOC.read_text() == markdown(build_parser()), \
        "docs/cli.md is stale: python -m medsynapse.cli.reference > docs/cli.md"


def test_every_command_and_every_option_says_what_it_does():
    found = list(commands(build_parser()))
    names = {" ".join(words) for words, _, _ in found}
    assert {"demo", "train", "study", "serve", "eval", "config show", "inspect"} <= names
    assert all(help_line for _, help_line, _ in found), [w for w, h, _ in found if not h]
    missing = [(" ".join(words), invocation(action)) for words, _, parser in found for action in options(parser)
               if not action.help]
    assert missing == []


def test_serving_bounds_default_to_the_documented_sizes():
    serve = dict(((" ".join(w)), p) for w, _, p in commands(build_parser()))["serve"]
    defaults = {action.dest: action.default for action in options(serve)}
    assert defaults["host"] == "127.0.0.1"
    assert defaults["max_pixels"] == 4096 * 4096 and defaults["max_body_mb"] == 32


def test_invocation_is_written_as_help_writes_it():
    parser = argparse.ArgumentParser()
    window = parser.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"))
    keys = parser.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    runs = parser.add_argument("runs", nargs="+", metavar="DIR")
    engine = parser.add_argument("-e", "--engine", choices=["hf", "vllm"])
    flag = parser.add_argument("--plan", action="store_true")
    written = " ".join(parser.format_help().split())
    for action in (window, keys, runs, engine, flag):
        assert invocation(action) in written
    assert invocation(engine) == "-e {hf,vllm}, --engine {hf,vllm}"
    assert invocation(runs) == "DIR [DIR ...]"
