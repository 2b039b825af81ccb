"""polychip.files: atomic writes, the cache folder, the run-folder lock."""
import errno
import os
import subprocess
import sys

import pytest

from polychip import files
from polychip.files import RunLock, RunLockedError, atomic_write, atomic_write_json, cache_dir


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write(p, "new")
    assert p.read_text() == '{\n "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["a.json"]  # no temp file left


def test_cache_dir_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    assert cache_dir("compile") == tmp_path / "compile"


def test_run_lock_is_exclusive_and_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        # flock is per open file description: a second one in this process conflicts as another process would.
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


def test_run_lock_is_dropped_when_the_holder_dies(tmp_path):
    code = (f"import os; from polychip.files import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            "os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=60)
    assert p.returncode == -9
    RunLock(tmp_path).acquire().release()  # no stale lock after kill -9
