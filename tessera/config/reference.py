"""The config reference, generated from the config models: `python -m tessera.config.reference`.

Every key of a run config, section by section, with its type, default and description. A key's
description is its `Field(description=...)`, else the comment lines right above it in the class
body and the comment at the end of its line; a subclass that only changes a default keeps its
parent's description. docs/config-reference.md is this module's output (`make config-docs`).
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from functools import cache

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tessera.config import ENV_OVERRIDES, RunConfig
from tessera.config.base import Section

HEADER = """\
# Config reference

Generated from the config models in `tessera/config/` by `python -m tessera.config.reference`
(`make config-docs`); a test fails when this file and the models disagree, so edit the models,
not this file.

A run config is one YAML file. An unknown key, a wrong type or a missing value stops the run at
load time, naming the file and the dotted key. Overrides, strongest first: `--set key.path=value`
on the command line (repeatable; the value is read as YAML), then these environment variables,
then the file:

| variable | key |
|---|---|
"""


@cache
def _own_comments(cls: type) -> dict[str, str]:
    """The comments of each field written in `cls`'s own body: the lines above it, then its line's end."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, tuple[str, bool]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            whole_line = lines[tok.start[0] - 1].lstrip().startswith("#")
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), whole_line)
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        end = comments.get(node.end_lineno)
        parts = above + ([end[0]] if end and not end[1] else [])
        out[node.target.id] = _join(parts)
    return out


def _join(lines: list[str]) -> str:
    """Comment lines as one sentence; a line that ends in a hyphen was cut inside a word."""
    text = ""
    for line in lines:
        text += line if not text or text.endswith("-") else " " + line
    return text


def _description(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.description:
        return field.description
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, Section) and cls is not Section:
            text = _own_comments(cls).get(name)
            if text:
                return text
    return ""


def _constraints(metadata: list) -> str:
    words = {"gt": "> {}", "ge": ">= {}", "lt": "< {}", "le": "<= {}", "multiple_of": "multiple of {}"}
    found = []
    for item in metadata:
        items = item.metadata if isinstance(item, FieldInfo) else [item]
        for constraint in items:
            for attr, text in words.items():
                value = getattr(constraint, attr, None)
                if value is not None:
                    found.append(text.format(value))
    return ", ".join(found)


def _section_of(annotation) -> type[Section] | None:
    """The Section class a field holds (itself, optional, or as the values of a mapping)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, dict) and args:
        return _section_of(args[-1])
    return None


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        extra = _constraints(list(args[1:]))
        return _type_name(args[0]) + (f" ({extra})" if extra else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _anchor(path: str) -> str:
    return "#" + "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(model: type[Section], path: str, out: list[tuple[str, type[Section]]]) -> None:
    out.append((path, model))
    for name, field in model.model_fields.items():
        child = _section_of(field.annotation)
        if child is None:
            continue
        key = f"{path}.{name}" if path else name
        if typing.get_origin(field.annotation) is dict:
            key += ".NAME"
        _sections(child, key, out)


def _table(model: type[Section], path: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        child = _section_of(field.annotation)
        kind = _type_name(field.annotation)
        if child is not None:
            target = key + (".NAME" if typing.get_origin(field.annotation) is dict else "")
            kind = kind.replace("section", f"[section]({_anchor(target)})", 1)
        else:
            extra = _constraints(field.metadata)
            kind += f" ({extra})" if extra else ""
        rows.append(f"| `{key}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(_description(model, name))} |")
    return rows


def render() -> str:
    """The whole reference as Markdown."""
    lines = HEADER.splitlines()
    lines += [f"| `{var}` | `{key}` |" for var, key in ENV_OVERRIDES.items()]
    sections: list[tuple[str, type[Section]]] = []
    _sections(RunConfig, "", sections)
    first_path: dict[type, str] = {}
    skip: list[str] = []
    for path, model in sections:
        if any(path.startswith(prefix + ".") for prefix in skip):
            continue
        lines += ["", f"## {path or 'top level'}", ""]
        if model in first_path:
            lines.append(f"The same keys as [{first_path[model]}]({_anchor(first_path[model])}).")
            skip.append(path)
            continue
        first_path[model] = path
        doc = next((c.__dict__["__doc__"] for c in model.__mro__[:model.__mro__.index(Section)]
                    if c.__dict__.get("__doc__")), None)
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += _table(model, path)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
