"""What each config key means, read from the dataclasses themselves: its type (a choice: its values), its default
and its meaning (`field(metadata={"help": ...})`, else the comment on the field's line(s), continued by comment-only
lines right below it when the next field has a comment of its own, else the comment-only lines right above it).
`medsynapse config show --explain` and the configuration reference (scripts/config_reference.py) read it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from pathlib import Path

SKIP = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT}


def class_node(cls: type) -> tuple[ast.ClassDef, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef) or node.name != cls.__name__:
        raise ValueError(f"{cls.__qualname__}: its source does not start with its class statement")
    return node, source


def _own_fields(cls: type) -> dict[str, dict]:
    """Per field defined in this class's own body: its annotation as written and its meaning from the comments."""
    node, source = class_node(cls)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in SKIP:
            code_lines.update(range(token.start[0], token.end[0] + 1))
    fields = [(n.target.id, n.lineno, n.end_lineno or n.lineno, ast.unparse(n.annotation)) for n in node.body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    starts = {start: name for name, start, _, _ in fields}
    ends = {end: name for name, _, end, _ in fields}
    own = {name: [comments[line] for line in range(start, end + 1) if line in comments and line in code_lines]
           for name, start, end, _ in fields}
    above: dict[str, list[str]] = {name: [] for name in own}
    below: dict[str, list[str]] = {name: [] for name in own}
    standalone = sorted(line for line in comments if line not in code_lines)
    blocks: list[list[int]] = []
    for line in standalone:
        if blocks and blocks[-1][-1] == line - 1:
            blocks[-1].append(line)
        else:
            blocks.append([line])
    for block in blocks:
        text = [comments[line] for line in block]
        previous, following = ends.get(block[0] - 1), starts.get(block[-1] + 1)
        if previous and own[previous]:
            said = " ".join(own[previous])
            if following is None or own[following] or said.count("(") > said.count(")"):
                below[previous] = text  # the previous field's comment goes on
                continue
        if following:
            above[following] = text  # a comment above the field it describes
    return {name: {"type": annotation,
                   "comment": " ".join(own[name] + below[name]) if own[name] else " ".join(above[name])}
            for name, _, _, annotation in fields}


def describe_fields(cls: type) -> list[dict]:
    """Every field of dataclass `cls` (inherited ones included): key, type, default and meaning."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    written: dict[str, dict] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and "__dataclass_fields__" in vars(klass):
            written.update(_own_fields(klass))
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        info = written.get(f.name, {"type": str(f.type), "comment": ""})
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        kind = " | ".join(json.dumps(c) for c in choices) if choices else info["type"]  # a choice: its values
        rows.append({"key": f.name, "type": kind, "choices": choices, "default": _default(f),
                     "meaning": str(f.metadata.get("help", "")) or info["comment"]})
    return rows


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        name = type(value).__name__
        return f"the [{name}](#{name.lower()}) defaults"
    return f"`{_value(value)}`"


def _value(value) -> str:
    """A default in YAML flow notation (JSON is valid YAML), never an object's address."""
    if isinstance(value, Path):
        value = str(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        text = repr(value)
        if " at 0x" in text:
            raise ValueError(f"default {text} would put a memory address in the reference") from None
        return text
