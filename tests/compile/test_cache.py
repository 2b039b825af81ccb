"""The compile cache's key covers polychip's own source: a code change that changes the compiled program
must not get an entry compiled before it (it did: `compile` returned a stale fit after a model change)."""
from __future__ import annotations

import shutil
from pathlib import Path

from polychip.compile import cache


def test_key_changes_with_the_source(monkeypatch):
    payload = {"cfg": {"model": {"d_model": 64}}, "target": "v6e:4x4", "mode": "train"}
    before = cache.key(payload)
    assert cache.key(payload) == before
    monkeypatch.setattr(cache, "source_fingerprint", lambda: "another source")
    assert cache.key(payload) != before


def test_fingerprint_follows_code_and_kernel_files_only(tmp_path):
    src = Path(cache.__file__).resolve().parents[1]
    tree = tmp_path / "pkg"
    shutil.copytree(src / "model", tree / "model")
    (tree / "kernels").mkdir()
    shutil.copy(src / "kernels" / "attention" / "decode_attention.cc", tree / "kernels")
    base = cache.fingerprint(tree)
    (tree / "notes.txt").write_text("not source")
    assert cache.fingerprint(tree) == base
    rope = tree / "model" / "rope.py"
    rope.write_text(rope.read_text() + "\n# changed\n")
    changed = cache.fingerprint(tree)
    assert changed != base
    cc = tree / "kernels" / "decode_attention.cc"
    cc.write_text(cc.read_text() + "\n// changed\n")
    assert cache.fingerprint(tree) != changed
    assert len(cache.source_fingerprint()) == 64
