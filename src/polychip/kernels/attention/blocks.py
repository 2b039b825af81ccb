"""Block sizes and block-visit arithmetic shared by the Pallas flash-attention backends.

A flash-attention kernel tiles queries into blocks of `bq` rows and keys into blocks of `bk` rows.
Sequences are padded up to whole blocks inside the wrapper; padded keys are masked through the
per-sequence valid length, padded query rows are computed and sliced off (their output cotangent is
zero, so they add nothing to dK/dV).

Block sizes come from, in order: an explicit `BlockSizes` argument; the tuned file
`tuned/<device-kind-slug>.json` (written by `polychip.kernels.attention.autotune`) for the call's
shape class; the heuristic default.

The visit arithmetic (`kv_block_range`, `q_block_range`, `block_is_full`) is written with `//`, `<`,
`min`/`max` so that it works on Python ints (cost estimates, tests) and on traced int32 scalars
(BlockSpec index maps, kernel bodies).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import jax.numpy as jnp

TUNED_DIR = Path(__file__).parent / "tuned"


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. `bq`/`bk`: forward and dQ kernels; `bq_dkv`/`bk_dkv`: the dK/dV kernel."""

    bq: int = 128
    bk: int = 128
    bq_dkv: int = 128
    bk_dkv: int = 128

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """Static description of one padded problem: what the kernels are specialised on."""

    T: int            # true query length
    S: int            # true key length
    bq: int
    bk: int
    Tp: int           # padded query length (multiple of bq)
    Sp: int           # padded key length (multiple of bk)

    @property
    def nq(self) -> int:
        return self.Tp // self.bq

    @property
    def nk(self) -> int:
        return self.Sp // self.bk


def fit_block(length: int, want: int, granule: int) -> tuple[int, int]:
    """(block, padded length) for a sequence of `length` with a preferred block `want`.

    A sequence shorter than `want` becomes one block of `length` rounded up to `granule` (the
    sublane tile: 16 covers bf16 and fp32 on TPU; a power of two for Triton). Otherwise the block is
    `want` and the length is padded to a multiple of it."""
    if length <= want:
        b = _round_up(max(length, 1), granule)
        return b, b
    return want, _round_up(length, want)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Which blocks a (query block, key block) pair needs. Positions: query row r of block i sits at
# q_offset + i*bq + r; key row c of block j at j*bk + c. Allowed: key < kv_len, causal -> key <=
# query, window W -> key > query - W.
# ---------------------------------------------------------------------------------------------
def _imin(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _imax(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _fdiv(a, b: int):
    """Floor division by a positive constant. For traced ints it avoids jnp's `//`, whose `sign`
    lowers in Mosaic through a query of the *host* device's TPU generation (fails in deviceless
    compiles)."""
    if isinstance(a, int):
        return a // b
    from jax import lax

    return lax.div(jnp.where(a < 0, a - (b - 1), a), jnp.int32(b))


def kv_block_range(i, q_offset, kv_len, *, bq, bk, nk, causal, window):
    """Inclusive [lo, hi] of key blocks that query block `i` attends to (empty when hi < lo)."""
    lo = 0
    if window is not None:
        lo = _imax(0, _fdiv(q_offset + i * bq - window + 1, bk))
    hi = _imin(nk - 1, _fdiv(kv_len - 1, bk))
    if causal:
        hi = _imin(hi, _fdiv(q_offset + (i + 1) * bq - 1, bk))
    return lo, hi


def q_block_range(j, q_offset, kv_len, *, bq, bk, nq, causal, window):
    """Inclusive [lo, hi] of query blocks that attend to key block `j` (empty when hi < lo)."""
    lo = 0
    if causal:
        lo = _imax(0, _fdiv(j * bk - q_offset, bq))
    hi = nq - 1
    if window is not None:
        hi = _imin(hi, _fdiv(j * bk + bk + window - 2 - q_offset, bq))
    # A key block entirely past the valid length is needed by nobody.
    past = j * bk >= kv_len
    if isinstance(past, bool):
        hi = -1 if past else hi
    else:
        hi = jnp.where(past, -1, hi)
    return lo, hi


def clamp_index(x, lo, hi, n):
    """x clamped to [lo, hi] and then to [0, n-1]: repeated indices make Pallas skip the copy."""
    return _imin(_imax(_imin(_imax(x, lo), hi), 0), n - 1)


def block_is_full(i, j, q_offset, kv_len, *, bq, bk, causal, window):
    """True when every (query, key) pair of block (i, j) is allowed, so no mask is needed."""
    full = (j + 1) * bk <= kv_len
    if causal:
        full = full & ((j + 1) * bk - 1 <= q_offset + i * bq)
    if window is not None:
        full = full & (j * bk > q_offset + (i + 1) * bq - 1 - window)
    return full


def visited_pairs(g: Geometry, *, causal, window) -> int:
    """Number of (q block, k block) pairs a static call (q_offset 0, all keys valid) computes."""
    n = 0
    for i in range(g.nq):
        lo, hi = kv_block_range(i, 0, g.S, bq=g.bq, bk=g.bk, nk=g.nk, causal=causal, window=window)
        n += max(0, hi - lo + 1)
    return n


# ---------------------------------------------------------------------------------------------
# Tuned block sizes: tuned/<device-kind-slug>.json = {"<shape class>": {"bq":..,"bk":..,...}}
# ---------------------------------------------------------------------------------------------
def device_slug(device_kind: str) -> str:
    """'TPU v6 lite' -> 'tpu-v6-lite'."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def shape_class(*, seq: int, head_dim: int, group: int, dtype: str, causal: bool, window: int | None) -> str:
    """Shape class key: head_dim, GQA group size, dtype, mask kind, and seq rounded up to a power of 2."""
    mask = "causal" if causal else "full"
    if window is not None:
        mask += "-window"
    return f"d{head_dim}-g{group}-{dtype}-{mask}-s{next_pow2(max(seq, 1))}"


@lru_cache(maxsize=64)
def _load_tuned(slug: str) -> dict:
    path = TUNED_DIR / f"{slug}.json"
    if not path.exists():
        return {}
    with open(path) as f:
        data = json.load(f)
    return data.get("entries", {})


def tuned_blocks(device_kind: str, key: str) -> BlockSizes | None:
    entry = _load_tuned(device_slug(device_kind)).get(key)
    if entry is None:
        return None
    return BlockSizes(**{k: int(entry[k]) for k in ("bq", "bk", "bq_dkv", "bk_dkv")})


def write_tuned(device_kind: str, entries: dict[str, dict], meta: dict, directory: Path = TUNED_DIR) -> Path:
    """Merge `entries` into directory/<slug>.json atomically (temp file + os.replace)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device_slug(device_kind)}.json"
    data = {"device_kind": device_kind, "meta": meta, "entries": {}}
    if path.exists():
        with open(path) as f:
            old = json.load(f)
        data["entries"].update(old.get("entries", {}))
    data["entries"].update(entries)
    data["entries"] = dict(sorted(data["entries"].items()))
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    _load_tuned.cache_clear()
    return path


def default_blocks(platform: str, *, seq: int, head_dim: int) -> BlockSizes:
    """Heuristic defaults. TPU: 512-row query blocks amortise the per-grid-step overhead and keep the
    MXU fed; key blocks of 512 (fwd) keep the [bq, bk] fp32 scores at 1 MiB of VMEM. GPU (Triton):
    64x64 tiles keep registers within budget for head_dim <= 128 on an SM."""
    if platform == "tpu":
        b = 512 if seq >= 1024 else 128
        return BlockSizes(bq=b, bk=b, bq_dkv=b, bk_dkv=b)
    return BlockSizes(bq=64, bk=64, bq_dkv=64, bk_dkv=64) if head_dim <= 128 else BlockSizes(32, 32, 32, 32)
