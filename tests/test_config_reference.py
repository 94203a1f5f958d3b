"""scripts/config_reference.py: docs/configuration.md is the fresh rendering of the config dataclasses, a new field
changes the rendering, and each key's meaning comes from its `help` metadata first, then from its comments."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Small:
    """A tiny config for these tests.

    Only the first paragraph is shown."""

    lr: float = 1e-4  # the learning rate
    steps: int = field(default=10, metadata={"help": "optimiser steps"})  # not this comment: help comes first
    names: list[str] = field(default_factory=lambda: ["a", "b"])  # names, read from a
    # continuation of the comment above (the next field has a comment of its own)
    mode: str = "x"  # x | y
    # what `plain` means: a comment above a field with no comment of its own
    plain: int = 0
    bare: bool = False


@dataclass
class Bigger(Small):
    """A tiny config for these tests.

    Only the first paragraph is shown."""

    added: int = 3  # a field added later


def test_the_committed_reference_is_a_fresh_rendering():
    script = _script()
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == script.render(), (
        "docs/configuration.md is stale: run `python scripts/config_reference.py` (or `make docs`) and commit it")
    assert str(ROOT) not in committed and " at 0x" not in committed  # nothing machine-specific


def test_adding_a_field_changes_the_rendering():
    script = _script()
    small, bigger = script.render_class(Small), script.render_class(Bigger)
    assert small != bigger
    assert "| `added` | `int` | `3` | a field added later |" in bigger and "`added`" not in small
    assert bigger.replace("Bigger", "Small").startswith(small.rstrip("\n"))  # the same rows, one more at the end
    assert "A tiny config for these tests." in small and "Only the first paragraph" not in small


def test_the_meaning_comes_from_help_metadata_then_from_the_comments():
    rows = {row["key"]: row for row in _script().describe_fields(Small)}
    assert rows["steps"]["meaning"] == "optimiser steps"  # metadata first, the trailing comment ignored
    assert rows["lr"]["meaning"] == "the learning rate"  # the trailing comment
    assert rows["names"]["meaning"] == ("names, read from a continuation of the comment above (the next field has a "
                                        "comment of its own)")
    assert rows["mode"]["meaning"] == "x | y"
    assert rows["plain"]["meaning"] == "what `plain` means: a comment above a field with no comment of its own"
    assert rows["bare"]["meaning"] == ""
    assert rows["names"]["default"] == '`["a", "b"]`'  # default_factory: its value
    assert rows["lr"]["type"] == "float" and rows["names"]["type"] == "list[str]"
    rendered = _script().render_class(Small)
    assert "| `mode` | `str` | `\"x\"` | x \\| y |" in rendered  # a `|` in a cell is escaped


def test_a_stale_file_fails_the_check_with_one_line_naming_it(tmp_path, monkeypatch, capsys):
    script = _script()
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(script, "OUTPUT", stale)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "render", lambda: "new\n")
    assert script.main(["--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configuration.md is stale" in err[0] and "config_reference.py" in err[0]
    assert script.main([]) == 0 and stale.read_text() == "new\n"
    assert script.main(["--check"]) == 0


def test_inherited_fields_keep_their_comments():
    @dataclass
    class Child(Small):
        extra: str = ""

    rows = {row["key"]: row for row in _script().describe_fields(Child)}
    assert rows["lr"]["meaning"] == "the learning rate" and rows["extra"]["meaning"] == ""
    assert [f.name for f in dataclasses.fields(Child)] == list(rows)


def test_config_show_explain_gives_every_resolved_key_once_with_its_meaning(capsys):
    import json as json_module

    from medsynapse.cli import main
    from medsynapse.runconfig import read_run_config, show

    path = ROOT / "configs" / "medsynapse-v-8b.yaml"
    assert main(["config", "show", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line and not line.startswith("#")]
    resolved = show(read_run_config(path))
    headers = [line for line in out.splitlines() if line.startswith("#")]
    assert headers[:3] == ["# output", "# model (ModelSection)", "# data (DataSection)"]  # each section named
    assert headers[-1] == "# baselines.ivt-lr (CoconutConfig)"
    expected = ["output"] + [f"{section}.{key}" for section in ("model", "data", "eval", "stage1", "stage2", "stage3")
                             for key in resolved[section]]
    expected += [f"baselines.{method}.{key}" for method, values in resolved["baselines"].items() for key in values]
    assert [line.split(":", 1)[0] for line in lines] == expected
    by_key = {line.split(":", 1)[0]: line for line in lines}
    assert by_key["stage2.dtype"] == ('stage2.dtype: "bfloat16"  # one of "auto" | "float32" | "bfloat16" | '
                                      '"float16" | "float64"')
    assert by_key["model.n_memory"].endswith("  # N probes / memory vectors")
    assert by_key["stage2.causal_form"].startswith('stage2.causal_form: "paper"  # paper: ')
    assert json_module.loads(by_key["stage2.lr"].split(": ", 1)[1]) == resolved["stage2"]["lr"]
