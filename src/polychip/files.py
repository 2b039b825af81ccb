"""Files the project writes: one atomic-write helper, one cache folder, one run-folder lock (RunLock).

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


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = True, **dump_kw: Any) -> Path:
    """json.dumps(obj) written atomically (indent=1, sorted keys unless given)."""
    dump_kw.setdefault("indent", 1)
    dump_kw.setdefault("sort_keys", True)
    return atomic_write(path, json.dumps(obj, **dump_kw) + "\n", fsync=fsync)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder (the CLI prints this on one line, exit 2)."""


class RunLock:
    """Exclusive lock on a run folder, so two `train` runs on one --out cannot interleave checkpoints
    and metrics. `flock` on <folder>/.polychip.lock: the kernel drops it when the holder dies (even
    kill -9), so there are no stale locks to clean up. The file keeps the holder's pid and host for
    the message; it is never deleted (deleting would let a third process lock a different inode).

        with RunLock(out):           # or: lock = RunLock(out).acquire(); ...; lock.release()
            ...
    """

    NAME = ".polychip.lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: run unlocked rather than not at all
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"run folder {self.path.parent} is in use by {holder}; wait for it to finish "
                                 "or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_file(path: str | os.PathLike, flag: str) -> str | None:
    """Why `path` cannot take an output file (a folder, or a parent that is a file), or None.
    Run before long work so a typo'd --json fails in a second, not after an hour of compiling."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {str(p)!r} is a folder; give a file path"
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{flag} {str(p)!r}: {str(parent)!r} is a file, not a folder"
    if parent is not None and not os.access(parent, os.W_OK):
        return f"{flag} {str(p)!r}: folder {str(parent)!r} is not writable"
    return None


def check_output_dir(path: str | os.PathLike, flag: str) -> str | None:
    """Why `path` cannot be (or be created as) a writable folder, or None."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{flag} {str(p)!r} is a file, not a folder"
    existing = p if p.exists() else next((a for a in p.parents if a.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{flag} {str(p)!r}: {str(existing)!r} is a file, not a folder"
    if existing is not None and not os.access(existing, os.W_OK):
        return f"{flag} {str(p)!r}: folder {str(existing)!r} is not writable"
    return None
