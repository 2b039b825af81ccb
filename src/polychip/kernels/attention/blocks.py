"""What the Pallas flash-attention backends (TPU and GPU) share: the specialisation (`Static`), the
score scaling / soft-cap and the mask, block sizes, and the block-visit arithmetic.

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
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from polychip.files import atomic_write_json
from polychip.kernels.pallas_common import next_pow2, round_up

TUNED_DIR = Path(__file__).parent / "tuned"


class BlockSizes(NamedTuple):
    """Tile sizes. `bq`/`bk`: forward and dQ kernels; `bq_dkv`/`bk_dkv`: the dK/dV kernel."""

    bq: int = 128
    bk: int = 128
    bq_dkv: int = 128
    bk_dkv: int = 128

    def as_dict(self) -> dict:
        return self._asdict()


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


@dataclass(frozen=True)
class Static:
    """Everything a flash kernel is specialised on (hashable: a custom_vjp non-diff argument).
    num_warps / num_stages: Triton only."""

    H: int
    K: int
    D: int
    causal: bool
    window: int | None
    soft_cap: float | None
    scale: float
    fwd: Geometry
    dkv: Geometry
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2

    @property
    def G(self) -> int:
        return self.H // self.K

    @staticmethod
    def create(q, k, *, causal, sliding_window, soft_cap, scale, fwd: Geometry, dkv: Geometry, interpret,
               **triton) -> "Static":
        H, D, K = q.shape[2], q.shape[3], k.shape[2]
        return Static(H=H, K=K, D=D, causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
                      soft_cap=None if soft_cap is None else float(soft_cap),
                      scale=float(D ** -0.5 if scale is None else scale), fwd=fwd, dkv=dkv, interpret=bool(interpret),
                      **triton)


def scaled_scores(s, st: Static):
    """Raw q.k products -> (scaled, soft-capped fp32 logits, the tanh for the backward or None)."""
    s = s * st.scale
    t = None
    if st.soft_cap is not None:
        t = jnp.tanh(s / st.soft_cap)
        s = st.soft_cap * t
    return s, t


def allowed(qpos, kpos, kv_len, st: Static):
    """Boolean mask of allowed (query, key) pairs from broadcastable absolute positions."""
    m = kpos < kv_len
    if st.causal:
        m = m & (kpos <= qpos)
    if st.window is not None:
        m = m & (kpos > qpos - st.window)
    return m


def offsets_and_lengths(B: int, S: int, q_offset, kv_lengths):
    """([B] int32 query offsets, [B] int32 valid key lengths clamped to S) from the API's options."""
    qoff = jnp.broadcast_to(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32).reshape(-1), (B,))
    kvl = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.minimum(
        jnp.asarray(kv_lengths, jnp.int32).reshape(B), S)
    return qoff, kvl


def fit_block(length: int, want: int, granule: int) -> tuple[int, int]:
    """(block, padded length) for a sequence of `length` with a preferred block `want`.

    A sequence shorter than `want` becomes one block of `length` rounded up to `granule` (the
    sublane tile: 16 covers bf16 and fp32 on TPU; a power of two for Triton). Otherwise the block is
    `want` and the length is padded to a multiple of it."""
    if length <= want:
        b = round_up(max(length, 1), granule)
        return b, b
    return want, round_up(length, want)


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
    """Merge `entries` into directory/<slug>.json atomically."""
    path = directory / f"{device_slug(device_kind)}.json"
    merged = {}
    if path.exists():
        merged.update(json.loads(path.read_text()).get("entries", {}))
    merged.update(entries)
    data = {"device_kind": device_kind, "meta": meta, "entries": dict(sorted(merged.items()))}
    atomic_write_json(path, data, sort_keys=False)
    _load_tuned.cache_clear()
    return path


def host_device_kind(platform: str) -> str:
    """This host's device kind when its first device is a `platform` chip, else ""."""
    try:
        d = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return ""
    return d.device_kind if d.platform == platform else ""


def pick_blocks(platform: str, *, T, S, H, K, D, dtype, causal, window, device_kind: str | None = None) -> BlockSizes:
    """Tuned entry for (device kind, shape class) when present, else the heuristic default. device_kind
    None: this host's (a deviceless compile passes the target's)."""
    if device_kind is None:
        device_kind = host_device_kind(platform)
    key = shape_class(seq=max(T, S), head_dim=D, group=H // K, dtype=dtype, causal=causal, window=window)
    return (tuned_blocks(device_kind, key) if device_kind else None) or default_blocks(platform, seq=max(T, S),
                                                                                        head_dim=D)


def default_blocks(platform: str, *, seq: int, head_dim: int) -> BlockSizes:
    """Heuristic defaults. TPU: 512-row query blocks amortise the per-grid-step overhead and keep the
    MXU fed; key blocks of 512 (fwd) keep the [bq, bk] fp32 scores at 1 MiB of VMEM. GPU (Triton):
    64x64 tiles keep registers within budget for head_dim <= 128 on an SM."""
    if platform == "tpu":
        b = 512 if seq >= 1024 else 128
        return BlockSizes(bq=b, bk=b, bq_dkv=b, bk_dkv=b)
    return BlockSizes(bq=64, bk=64, bq_dkv=64, bk_dkv=64) if head_dim <= 128 else BlockSizes(32, 32, 32, 32)
