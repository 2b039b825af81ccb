"""On-disk cache of compile results, keyed by everything that affects them.

Key = sha256 of: the full config dict, target text, mesh sizes, the step's shapes (mode, batch, seq),
the jax / jaxlib / libtpu versions, polychip's own source (every .py, .cc and .json file of the package:
a change to the model or a kernel changes the compiled program, and an entry keyed without it was
returned stale after one), and CACHE_VERSION (bump it when what we store changes).
Location: $POLYCHIP_CACHE_DIR or ~/.cache/polychip/compile. One JSON file per entry, written
atomically; a corrupt entry is treated as a miss and overwritten.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path

from polychip.files import atomic_write_json, cache_dir

CACHE_VERSION = 7  # 7: memory carries the buffer assignment's HBM total; 6: a computation closed with attributes ends there (hlo parser); 5: hlo stats carry the estimator's ops; 4: serve compiles the engine's paged step


def _dir() -> Path:
    return cache_dir("compile")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict:
    return {p: _version(p) for p in ("jax", "jaxlib", "libtpu", "optax")}


def fingerprint(root: Path) -> str:
    """sha256 over the .py, .cc and .json files under root (relative path and bytes, in path order)."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.suffix in (".py", ".cc", ".json") and q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """fingerprint of the polychip package's source; computed once per process."""
    return fingerprint(Path(__file__).resolve().parents[1])


def key(payload: dict) -> str:
    body = json.dumps({"v": CACHE_VERSION, "versions": versions(), "source": source_fingerprint(), **payload},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def load(k: str) -> dict | None:
    p = _dir() / f"{k}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def store(k: str, value: dict) -> None:
    try:
        atomic_write_json(_dir() / f"{k}.json", value, indent=None, sort_keys=False)
    except OSError as e:
        # A cache that cannot be written must not throw away the compile that produced the value.
        warnings.warn(f"could not write the compile cache in {_dir()} ({e.strerror or e})", stacklevel=2)
