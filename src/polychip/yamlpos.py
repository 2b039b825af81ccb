"""YAML loading that remembers where each value was written, so user errors can name the line.

`load(text, name)` returns `(data, lines)`: `data` is what `yaml.safe_load` gives, `lines` maps a
path tuple (mapping keys and list indices, e.g. ("pools", 2, "count")) to its 1-based line. Used
by the chip catalog, the fleet planner's file parser and config files.

Stricter than safe_load in two ways. Anchors/aliases are refused: an alias shares a node, so a
few lines of nested `&a [*a, *a]` expand to 2**N values for any walk over the data (a "billion
laughs" file would exhaust memory); no file here needs them. Duplicate mapping keys are refused:
safe_load silently keeps the last, so a typo'd second `count:` would win without a word.
"""
from __future__ import annotations

from typing import Any

import yaml


#: libyaml's C loader when present (about 10x faster on large fleet files), else the pure-Python one.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


#: Deeper nesting than this is refused (Python's recursion limit would otherwise turn it into a crash).
MAX_DEPTH = 100


class YamlSyntaxError(ValueError):
    """The text is not valid YAML, or uses what we refuse (the message carries file and line)."""


def _walk(node: yaml.Node, path: tuple, out: dict[tuple, int], seen: set[int], name: str) -> None:
    line = node.start_mark.line + 1
    if id(node) in seen:
        # The composer hands out the anchored node again for each alias: a node met twice is an alias.
        raise YamlSyntaxError(f"{name} line {line}: YAML anchors and aliases (&name, *name) are not supported; "
                              "write the values out")
    if len(path) > MAX_DEPTH:
        raise YamlSyntaxError(f"{name} line {line}: nested more than {MAX_DEPTH} levels deep")
    seen.add(id(node))
    out[path] = line
    if isinstance(node, yaml.MappingNode):
        keys: set = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            if key in keys:
                raise YamlSyntaxError(f"{name} line {k.start_mark.line + 1}: duplicate key {key!r}")
            keys.add(key)
            _walk(v, path + (key,), out, seen, name)
            # The key's own line is the useful one for messages ("unknown key", "bad value").
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, path + (i,), out, seen, name)


def read_text(path, name: str | None = None) -> str:
    """A YAML/text file's contents as UTF-8; a binary or mis-encoded file is a YamlSyntaxError
    naming the file (not a UnicodeDecodeError from deep inside)."""
    name = name or str(path)
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        raise YamlSyntaxError(f"{name}: is a binary file, not YAML text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise YamlSyntaxError(f"{name} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def load(text: str, name: str = "<yaml>") -> tuple[Any, dict[tuple, int]]:
    """Parse `text`; returns (data, {path tuple: line}). Raises YamlSyntaxError naming `name`:line."""
    # One parse: compose the node tree (keeps line marks), then construct plain data from it.
    loader = _Loader(text)
    lines: dict[tuple, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            # Walk before constructing: aliases and duplicates are refused before anything expands.
            _walk(node, (), lines, set(), name)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name} line {mark.line + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e)
        raise YamlSyntaxError(f"{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise YamlSyntaxError(f"{name}: nested too deeply") from None
    finally:
        loader.dispose()
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
