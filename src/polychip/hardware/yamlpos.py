"""YAML loading that remembers where each value was written, so user errors can name the line.

`load(text, name)` returns `(data, lines)`: `data` is what `yaml.safe_load` gives, `lines` maps a
path tuple (mapping keys and list indices, e.g. ("pools", 2, "count")) to its 1-based line. Used
by the chip catalog and the fleet planner's file parser.
"""
from __future__ import annotations

from typing import Any

import yaml


#: libyaml's C loader when present (about 10x faster on large fleet files), else the pure-Python one.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlSyntaxError(ValueError):
    """The text is not valid YAML (the message carries file and line)."""


def _walk(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            _walk(v, path + (key,), out)
            # The key's own line is the useful one for messages ("unknown key", "bad value").
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, path + (i,), out)


def load(text: str, name: str = "<yaml>") -> tuple[Any, dict[tuple, int]]:
    """Parse `text`; returns (data, {path tuple: line}). Raises YamlSyntaxError naming `name`:line."""
    # One parse: compose the node tree (keeps line marks), then construct plain data from it.
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name} line {mark.line + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e)
        raise YamlSyntaxError(f"{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """Line of `path`, or of its nearest ancestor that has one."""
    p = tuple(path)
    while p:
        key = tuple(str(x) if not isinstance(x, int) else x for x in p)
        if key in lines:
            return lines[key]
        if p in lines:
            return lines[p]
        p = p[:-1]
    return lines.get(())


def where(name: str, lines: dict[tuple, int], path: tuple) -> str:
    """'file line N, field a.b.c' for error messages."""
    ln = line_of(lines, path)
    dotted = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in path).replace(".[", "[")
    loc = f"{name} line {ln}" if ln is not None else name
    return f"{loc}, field {dotted}" if dotted else loc
