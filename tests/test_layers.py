"""Import layering: a unit of polychip (a package, or a top-level module) imports only units of lower layers.

Every import counts: module level, inside functions, relative, and a string literal that names a polychip
module (what `importlib.import_module` and `importlib.resources` are given). Imports inside one unit are
free. The README's "Layout" section and each package's __init__ docstring ("Owns:", "May import:") say
the same as LAYERS; the last test keeps the docstrings in step with it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import polychip

SRC = Path(polychip.__file__).parent

#: unit -> layer. A unit may import units of strictly lower layers; units of one layer are independent.
LAYERS = {
    "polychip": 0,  # the root __init__: the version string
    "files": 0,  # atomic writes, the cache folder, the run-folder lock (standard library only)
    "yamlpos": 0,  # YAML with line numbers, refusing aliases, duplicate keys and binary files (PyYAML)
    "config": 1,  # typed config dataclasses, presets, YAML + overrides
    "hardware": 1,  # the chip catalog, device detection
    "data": 2,  # corpus, tokenizer, batches
    "kernels": 2,  # the kernel registry and the ops (takes a sharding layout by duck typing)
    "parallel": 2,  # mesh, logical-axis rules, multi-process start-up
    "model": 3,  # the transformer, FLOPs, Hugging Face conversion
    "train": 4,  # optimiser, step, loop, checkpoints, metrics, bench
    "estimate": 4,  # the one step-time estimator (per-op costs) that compile and plan share
    "plan": 5,  # the fleet planner
    "infer": 5,  # sampling parameters and their validator, sampling, loading a checkpoint for inference
    "serve": 6,  # the serving engine and HTTP API
    "compile": 7,  # deviceless compile (lowers train's and serve's steps, models GPUs with plan's roofline)
    "generate": 7,  # `polychip generate`
    "cli": 8,  # the `polychip` command
}

#: (importing module, imported unit) -> why it is still there. Known breaks of the layering stay visible
#: here until they are fixed; an entry that no longer happens fails `test_known_breaks_still_happen`
#: so that it is deleted.
KNOWN: dict = {}

_MODULE_NAME = re.compile(r"polychip(\.\w+)+")


def _module_exists(name: str) -> bool:
    p = SRC.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "polychip"


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported polychip module) for every import in `source`, the text of module `module`."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[:len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            if target == "polychip":  # `from polychip import x`: x is a unit, or a name in the root
                out += [(n.lineno, f"polychip.{a.name}" if _module_exists(f"polychip.{a.name}") else "polychip")
                        for a in n.names]
            else:
                out.append((n.lineno, target))
        elif (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
              and _MODULE_NAME.fullmatch(n.value) and _module_exists(n.value)):
            out.append((n.lineno, n.value))
    return [(line, m) for line, m in out if m == "polychip" or m.startswith("polychip.")]


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        is_package = rel.name == "__init__"
        yield path, ".".join(rel.parts[:-1] if is_package else rel.parts), is_package


def breaks(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, str]]:
    """(line, imported module, message) for each import of `module` that the layering forbids."""
    unit = unit_of(module)
    out = []
    for line, target in imports(source, module, is_package):
        other = unit_of(target)
        if other != unit and LAYERS[other] >= LAYERS[unit]:
            out.append((line, target, f"{module}:{line} imports {target}: {other} is on layer {LAYERS[other]}, "
                                      f"{unit} on layer {LAYERS[unit]} may import only lower layers"))
    return out


def _all_breaks():
    found = []
    for path, module, is_package in _modules():
        found += [(module, unit_of(target), msg) for _, target, msg in breaks(path.read_text(), module, is_package)]
    return found


def test_every_unit_has_a_layer():
    units = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert units | {"polychip"} == set(LAYERS), "place each new package or top-level module in LAYERS (and the README)"


def test_imports_follow_the_layers():
    bad = [msg for module, other, msg in _all_breaks() if (module, other) not in KNOWN]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_known_breaks_still_happen():
    seen = {(module, other) for module, other, _ in _all_breaks()}
    gone = [f"{m} -> {u}" for m, u in KNOWN if (m, u) not in seen]
    assert not gone, "fixed, so delete from KNOWN in tests/test_layers.py: " + ", ".join(gone)


@pytest.mark.parametrize("source, expected", [
    ("from polychip.train.step import jit_train_step\n", ["polychip.train.step"]),
    ("def f():\n    import polychip.serve.engine as e\n", ["polychip.serve.engine"]),
    ("from polychip import cli\n", ["polychip.cli"]),
    ("import importlib\nm = importlib.import_module('polychip.compile.run')\n", ["polychip.compile.run"]),
    ("from ..plan import fleet\n", ["polychip.plan"]),
    ("from polychip.config import Config\nfrom polychip.files import atomic_write\nfrom . import mesh\n", []),
    ('"""See polychip.train.loop."""\nlog = "polychip.model"\n', []),
])
def test_the_checker_sees_every_kind_of_import(source, expected):
    # As if written in polychip/model/transformer.py (layer 3): train, serve, cli, compile and plan are above it.
    assert [t for _, t, _ in breaks(source, "polychip.model.transformer")] == expected


def _docstring_lines(path: Path) -> dict[str, str]:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in doc.splitlines()) if k in ("Owns", "May import")}


@pytest.mark.parametrize("package", sorted(p.parent.name for p in SRC.glob("*/__init__.py")))
def test_package_docstring_states_owns_and_may_import(package):
    lines = _docstring_lines(SRC / package / "__init__.py")
    assert lines.get("Owns"), f"polychip/{package}/__init__.py: the docstring needs an 'Owns: ...' line"
    assert "May import" in lines, f"polychip/{package}/__init__.py: the docstring needs a 'May import: ...' line"
    stated = set(re.findall(r"\w+", lines["May import"].split("(")[0])) - {"nothing", "polychip"}
    allowed = {u for u, layer in LAYERS.items() if layer < LAYERS[package] and u != "polychip"}
    assert stated == allowed, f"polychip/{package}: 'May import' says {sorted(stated)}, LAYERS allows {sorted(allowed)}"
