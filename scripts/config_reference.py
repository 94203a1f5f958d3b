"""Write docs/configuration.md, the configuration reference, from the config dataclasses themselves.

`python scripts/config_reference.py` (or `make docs`) writes the file; `--check` writes nothing and exits 1, with one
line naming the file, when the file differs from a fresh rendering (tests/test_config_reference.py runs the check).

For each config class, in the order of CLASSES: a heading, where the class is read from, its docstring's first
paragraph, and a table `| key | type | default | meaning |`. The type is the field's annotation as written; the
default is the value (a `default_factory` is called and its value shown; a nested dataclass points to its own
heading). The meaning is, first, `dataclasses.field(metadata={"help": ...})`; else the comment on the field's own
line(s), continued by the comment-only lines right below it when the next field has a comment of its own (or there
is no next field, or the comment leaves a parenthesis open); else the comment-only lines right above the field; else
empty. Nothing in the output depends on the machine: no absolute paths, no object addresses.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "configuration.md"
if str(ROOT / "src") not in sys.path:  # the repository's own code, whichever copy of the package is installed
    sys.path.insert(0, str(ROOT / "src"))

from medsynapse.config_fields import class_node, describe_fields  # noqa: E402 (after the path above)

STAGE_SECTION = ("The run file's `{stage}` section, resolved by `runconfig.resolve`. The `output`, `model` and "
                 "`data` sections fill in {filled}; a key in the `{stage}` section wins.")
# (module, class name, where it is read): the page's order.
CLASSES = [
    ("medsynapse.runconfig", "RunConfig",
     "A run file's top level: `medsynapse pipeline | train | config show | demo --config FILE` "
     "(`--set key=value` overrides any key)."),
    ("medsynapse.runconfig", "ModelSection", "The run file's `model` section."),
    ("medsynapse.runconfig", "DataSection", "The run file's `data` section."),
    ("medsynapse.data.corpora", "CorpusSpec",
     "One entry of `data.stage1_corpora`, `data.stage2_corpora` or `data.rationale_corpora`."),
    ("medsynapse.runconfig", "EvalSection", "The run file's `eval` section (the pipeline's `eval` step)."),
    ("medsynapse.recipes.stage1_warmup", "Stage1Config", "stage1"),
    ("medsynapse.recipes.stage2_ccr", "Stage2Config", "stage2"),
    ("medsynapse.recipes.stage3_imt", "Stage3Config", "stage3"),
    ("medsynapse.recipes.sft", "SFTConfig",
     "The run file's `baselines.sft` and `baselines.cot-sft` sections, over what `runconfig.resolve_baseline` fills "
     "in from the model section and Stage I. (`baselines.grpo` is a Stage2Config: Stage II's resolved settings "
     "without memory.)"),
    ("medsynapse.recipes.coconut", "CoconutConfig",
     "The run file's `baselines.coconut` and `baselines.ivt-lr` sections, over what `runconfig.resolve_baseline` "
     "fills in."),
    ("medsynapse.recipes.mcout", "MCOUTConfig",
     "The run file's `baselines.mcout` section, over what `runconfig.resolve_baseline` fills in."),
    ("medsynapse.eval.runner", "EvalSettings",
     "The benchmark harness's settings: `medsynapse eval`'s options; the pipeline fills them from the run file's "
     "`eval` section, the study from its own keys."),
    ("medsynapse.study", "StudyConfig", "A study file: `medsynapse study --config FILE`."),
    ("medsynapse.study", "RowSpec", "One entry of a study file's `rows`."),
    ("medsynapse.steps.synthmed", "DemoConfig", "Read by `medsynapse demo` (`make demo`)."),
]

def _cell(text: str) -> str:
    """A table cell: `|` escaped everywhere (GFM tables split on it even in code spans), `<` and `>` escaped outside
    code spans so that `<answer>` shows as text, not as an HTML tag."""
    parts = text.replace("\n", " ").split("`")
    parts = [p if i % 2 else p.replace("<", "\\<").replace(">", "\\>") for i, p in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|")


def _first_paragraph(cls: type) -> str:
    doc = ast.get_docstring(class_node(cls)[0]) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _wrap(text: str) -> str:
    return textwrap.fill(text, 120, break_on_hyphens=False, break_long_words=False)


def render_class(cls: type, where: str = "") -> str:
    """The section of one config class: heading, where it is read, docstring, table."""
    lines = [f"## {cls.__name__}", "", _wrap(f"`{cls.__module__}.{cls.__qualname__}`. {where}".strip()), ""]
    doc = _first_paragraph(cls)
    if doc:
        lines += [_wrap(doc), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in describe_fields(cls):
        cells = [f"`{row['key']}`", f"`{row['type']}`", row["default"], row["meaning"]]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _where(text: str) -> str:
    if text not in ("stage1", "stage2", "stage3"):
        return text
    from medsynapse.runconfig import RunConfig, _filled

    filled = ", ".join(f"`{key}`" for key in _filled(RunConfig(), text))
    return STAGE_SECTION.format(stage=text, filled=filled)


def render(classes: list[tuple[str, str, str]] | None = None) -> str:
    """The whole configuration reference (docs/configuration.md)."""
    entries = [(getattr(importlib.import_module(module), name), where) for module, name, where in classes or CLASSES]
    head = [
        "# Configuration reference",
        "",
        _wrap("This page lists every key of the run file, the recipes, the study and the demo, with its type, default "
              "and meaning. It is generated from the config dataclasses by `python scripts/config_reference.py` "
              "(`make docs`): do not edit it by hand; change the field's comment (or its `metadata={\"help\": ...}`) "
              "and run the script again. How the files are used: [training.md](training.md)."),
        "",
        *(f"- [{cls.__name__}](#{cls.__name__.lower()})" for cls, _ in entries),
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(render_class(cls, _where(where)) for cls, where in entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from a fresh rendering")
    args = parser.parse_args(argv)
    text = render()
    name = OUTPUT.relative_to(ROOT)
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{name} is stale: run `python scripts/config_reference.py` (or `make docs`)", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
