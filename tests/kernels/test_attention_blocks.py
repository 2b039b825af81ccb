"""Block-visit arithmetic of the flash kernels vs a brute-force mask, and the tuned-block lookup."""
from __future__ import annotations

import itertools
import json

import numpy as np

from polychip.kernels.attention import blocks as B_
from polychip.kernels.attention import pallas_tpu


def test_block_ranges_cover_exactly_the_blocks_with_allowed_pairs():
    for T, S, bq, bk, causal, window, qoff, kvlen in itertools.product(
            (1, 17, 64), (17, 64, 100), (16, 32), (16, 48), (True, False), (None, 1, 20), (0, 5, 40), (0, 9, 100)):
        kvlen = min(kvlen, S)
        nq, nk = -(-T // bq), -(-S // bk)
        allowed = np.zeros((nq * bq, nk * bk), bool)
        qpos, kpos = qoff + np.arange(T)[:, None], np.arange(S)[None, :]  # the reference's mask, in numpy
        m = (kpos < kvlen) & ((kpos <= qpos) if causal else True) & ((kpos > qpos - window) if window else True)
        allowed[:T, :S] = m
        need = allowed.reshape(nq, bq, nk, bk).any(axis=(1, 3))
        full = allowed.reshape(nq, bq, nk, bk).all(axis=(1, 3))
        kw = dict(bq=bq, bk=bk, causal=causal, window=window)
        for i in range(nq):
            lo, hi = B_.kv_block_range(i, qoff, kvlen, nk=nk, **kw)
            got = np.zeros(nk, bool)
            got[max(lo, 0):hi + 1] = True
            # Every needed block is visited; extra visits happen only past the valid keys / queries
            # (they are masked to zero) and never for rows inside the true length T.
            assert not (need[i] & ~got).any(), (T, S, bq, bk, causal, window, qoff, kvlen, i)
        for j in range(nk):
            lo, hi = B_.q_block_range(j, qoff, kvlen, nq=nq, **kw)
            got = np.zeros(nq, bool)
            got[max(lo, 0):hi + 1] = True
            assert not (need[:, j] & ~got).any(), (T, S, bq, bk, causal, window, qoff, kvlen, j)
        for i, j in itertools.product(range(nq), range(nk)):
            if B_.block_is_full(i, j, qoff, kvlen, **kw) and i * bq + bq <= T:
                assert full[i, j]


def test_causal_ranges_skip_blocks_above_the_diagonal():
    lo, hi = B_.kv_block_range(0, 0, 1024, bq=128, bk=128, nk=8, causal=True, window=None)
    assert (lo, hi) == (0, 0)
    lo, hi = B_.kv_block_range(7, 0, 1024, bq=128, bk=128, nk=8, causal=True, window=256)
    assert (lo, hi) == (5, 7)
    assert B_.visited_pairs(B_.Geometry(1024, 1024, 128, 128, 1024, 1024), causal=True, window=None) == 36


def test_tuned_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(B_, "TUNED_DIR", tmp_path)
    B_._load_tuned.cache_clear()
    key = B_.shape_class(seq=3000, head_dim=128, group=4, dtype="bfloat16", causal=True, window=None)
    assert key == "d128-g4-bfloat16-causal-s4096"
    path = B_.write_tuned("TPU v6 lite", {key: {"bq": 256, "bk": 1024, "bq_dkv": 512, "bk_dkv": 512}}, {"m": 1},
                          directory=tmp_path)
    assert path.name == "tpu-v6-lite.json" and json.loads(path.read_text())["entries"][key]["bk"] == 1024
    got = pallas_tpu.pick_blocks(T=3000, S=3000, H=32, K=8, D=128, dtype="bfloat16", causal=True, window=None,
                                 device_kind="TPU v6 lite")
    assert got == B_.BlockSizes(256, 1024, 512, 512)
    other = pallas_tpu.pick_blocks(T=3000, S=3000, H=32, K=8, D=128, dtype="bfloat16", causal=True, window=None,
                                   device_kind="TPU v5 lite")
    assert other == B_.default_blocks("tpu", seq=3000, head_dim=128)
    B_._load_tuned.cache_clear()
