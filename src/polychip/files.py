"""Files the project writes: one atomic-write helper, one cache folder, one run-folder lock.

Layer 0 (imports only the standard library): every package may use it.

Why atomic: a reader (a resumed run, `generate`, the planner) must never see half a file, and a crash
or full disk must leave the previous version in place. Everything goes to a temp file in the same
folder (same file system, so the rename is atomic), is flushed and fsynced, then `os.replace`d.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def cache_dir(sub: str = "") -> Path:
    """The one place POLYCHIP_CACHE_DIR is read (default ~/.cache/polychip); `sub` is a folder in it."""
    env = os.environ.get("POLYCHIP_CACHE_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "polychip"
    return root / sub if sub else root


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO], Any], *, mkdir: bool = True,
                 fsync: bool = True) -> Path:
    """Write `data` (text, bytes, or a callable given the open binary file) to `path` atomically.

    The temp file is removed on any failure (including KeyboardInterrupt), so the old file, if any, is
    untouched. Returns the path."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> Path:
    """json.dumps(obj) written atomically (indent=1, sorted keys unless given)."""
    dump_kw.setdefault("indent", 1)
    dump_kw.setdefault("sort_keys", True)
    return atomic_write(path, json.dumps(obj, **dump_kw) + "\n")
