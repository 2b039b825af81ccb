"""On-disk cache of compile results, keyed by everything that affects them.

Key = sha256 of: the full config dict, target text, mesh sizes, the step's shapes (mode, batch, seq),
the jax / jaxlib / libtpu versions, and CACHE_VERSION (bump it when what we store changes).
Location: $POLYCHIP_CACHE_DIR or ~/.cache/polychip/compile. One JSON file per entry, written
atomically; a corrupt entry is treated as a miss and overwritten.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path

from polychip.files import atomic_write_json, cache_dir

CACHE_VERSION = 6  # 6: a computation closed with attributes ends there (hlo parser); 5: hlo stats carry the estimator's ops; 4: serve compiles the engine's paged step


def _dir() -> Path:
    return cache_dir("compile")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict:
    return {p: _version(p) for p in ("jax", "jaxlib", "libtpu", "optax")}


def key(payload: dict) -> str:
    body = json.dumps({"v": CACHE_VERSION, "versions": versions(), **payload}, sort_keys=True, default=str)
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
