"""The config reference of the docs, generated from the schema: every field of every section with its type, default
and meaning, read from the dataclasses in :mod:`pipeline.config.schema` (and the site file's :class:`SiteConfig`).

A field's meaning is its comment in the source: the ``# ...`` lines right above it and the ``# ...`` at the end of
its line (``tests/test_docs.py`` names a field without either). A comment line ending in ``:`` heads the fields
below it (``# on the batch, after normalisation:``) and becomes a row of its own. The mkdocs hook
(``docs/hooks.py``) puts the tables where a page says ``<!-- config-reference: train -->`` or
``<!-- config-reference: site -->``; ``python docs/gen_config_reference.py [train|site]`` prints them.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from typing import Any, Iterator

from pipeline.config.schema import TrainConfig
from pipeline.config.site import SiteConfig

ROOTS = {"train": TrainConfig, "site": SiteConfig}


@dataclasses.dataclass
class FieldDoc:
    name: str        # dotted, e.g. "schedule.lr.warmup_epochs"
    type: str        # the annotation as written in the source
    default: Any
    meaning: str     # the field's comments, joined
    group: str = ""  # the heading comment above it, if any


def field_comments(cls: type) -> dict[str, tuple[str, str, str]]:
    """``{field: (annotation source, comment text, group heading)}`` for the class-level annotated assignments of
    ``cls``."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}   # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out, group = {}, ""
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        if above and above[-1].endswith(":"):
            group = above.pop().removesuffix(":")
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments
                    and not lines[n - 1].strip().startswith("#")]
        text = " ".join(part.removesuffix(" -") for part in above + trailing if part)
        out[node.target.id] = (ast.get_source_segment(source, node.annotation), text, group)
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, list[FieldDoc]]]:
    """``(section name, fields)`` for ``cls`` and each nested section dataclass, depth first."""
    docs = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        value = default_of(f)
        if dataclasses.is_dataclass(value):
            nested.append((f"{prefix}{f.name}.", type(value)))
            continue
        annotation, meaning, group = docs.get(f.name, ("", "", ""))
        rows.append(FieldDoc(f"{prefix}{f.name}", annotation, value, meaning, group))
    if rows:
        yield prefix.rstrip(".") or cls.__name__, rows
    for sub_prefix, sub_cls in nested:
        yield from walk(sub_cls, sub_prefix)


def yaml_value(value: Any) -> str:
    """A default as a recipe would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e-3 or value != round(value, 4) else repr(value)
    if value == "":
        return '""'
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(root: str = "train") -> str:
    """The reference tables of one root (``train``: TrainConfig's sections; ``site``: the site file)."""
    out = []
    for section, rows in walk(ROOTS[root]):
        if root == "train":
            out += [f"### `{section}`", ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        group = ""
        for r in rows:
            if r.group != group:
                group = r.group
                out.append(f"| *{cell(group)}* | | | |")
            out.append(f"| `{r.name}` | `{cell(r.type)}` | `{cell(yaml_value(r.default))}` | {cell(r.meaning)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(sys.argv[1] if len(sys.argv) > 1 else "train"))
