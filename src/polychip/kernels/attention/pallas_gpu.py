"""Flash attention for NVIDIA GPUs in Pallas (Triton lowering): forward, and a backward of two kernels.

Layout: the API's own [B, T, H, D] (Triton blocks may squeeze the head axis, so no transposes); T and
S are padded to whole blocks. Every program owns one (batch, head, block) and loops over the other
sequence with `lax.fori_loop` between the first and last block it needs (causal / window / valid-
length block skipping: skipped blocks are neither loaded nor computed). GQA/MQA: the key/value
BlockSpec index map reads kv head h // G; K/V are never repeated.

Kernels:
  forward  grid (B, H, nq): online softmax over key blocks; writes o and lse [B, H, Tp] (fp32).
  dQ       grid (B, H, nq): loop over key blocks.
  dK/dV    grid (B, H, nk): loop over query blocks, per *query* head; with G > 1 the G partial
           results (fp32 [B, Sp, H, D]) are summed over the group in the wrapper. That costs one
           transient fp32 buffer the size of Q instead of cross-program atomics.

Per-sequence query offset and valid key length ride in a [B, 2] int32 side input (may be traced).
Triton needs power-of-two block shapes: block sizes and head_dim must be powers of two.

Verified here only with `interpret=True` on CPU; the Triton/PTX path for a real GPU is unverified.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - Triton lowering missing from this jaxlib
    pl = plgpu = None

from polychip.kernels.attention import blocks as B_
from polychip.kernels.attention.blocks import BlockSizes, Geometry

NEG_INF = -1e30


@dataclass(frozen=True)
class Static:
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


def _dot(a, b, trans_b=False):
    if a.dtype == jnp.float32:  # fp32 inputs: full fp32, not TF32, to match the reference
        return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False)
    return plgpu.dot(a, b, trans_b=trans_b)


def _scores(q, k, st: Static):
    s = _dot(q, k, trans_b=True) * st.scale
    t = None
    if st.soft_cap is not None:
        t = jnp.tanh(s / st.soft_cap)
        s = st.soft_cap * t
    return s, t


def _mask(i, j, qoff, kvlen, bq, bk, st: Static):
    qpos = (qoff + i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    m = kpos < kvlen
    if st.causal:
        m = m & (kpos <= qpos)
    if st.window is not None:
        m = m & (kpos > qpos - st.window)
    return m


def _params(st: Static):
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


# ---------------------------------------------------------------------------------------------
def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: Static):
    g = st.fwd
    i = pl.program_id(2)
    qoff, kvlen = meta_ref[0], meta_ref[1]
    lo, hi = B_.kv_block_range(i, qoff, kvlen, bq=g.bq, bk=g.bk, nk=g.nk, causal=st.causal, window=st.window)
    q = q_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(j * g.bk, g.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s, _ = _scores(q, k, st)
        mask = _mask(i, j, qoff, kvlen, g.bq, g.bk, st)
        s = jnp.where(mask, s, NEG_INF)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_prev * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((g.bq, st.D), jnp.float32), jnp.full((g.bq,), NEG_INF, jnp.float32),
            jnp.zeros((g.bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi + 1, body, init)
    safe = jnp.where(l == 0.0, 1.0, l)  # a row with no allowed key outputs 0 (as the reference)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(safe)


def _kv_head(h, G):
    return lax.div(h, jnp.int32(G))


def _fwd_call(st: Static, q, k, v, meta):
    g, Bn, G = st.fwd, q.shape[0], st.G
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(Bn, st.H, g.nq),
        in_specs=[
            pl.BlockSpec((None, 2), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, g.bq, None, st.D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, g.Sp, None, st.D), lambda b, h, i: (b, 0, _kv_head(h, G), 0)),
            pl.BlockSpec((None, g.Sp, None, st.D), lambda b, h, i: (b, 0, _kv_head(h, G), 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, g.bq, None, st.D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, g.bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((Bn, st.H, g.Tp), jnp.float32)],
        compiler_params=_params(st),
        interpret=st.interpret,
        name="polychip_flash_fwd_gpu",
    )(meta, q, k, v)


# ---------------------------------------------------------------------------------------------
def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, st: Static):
    g = st.fwd
    i = pl.program_id(2)
    qoff, kvlen = meta_ref[0], meta_ref[1]
    lo, hi = B_.kv_block_range(i, qoff, kvlen, bq=g.bq, bk=g.bk, nk=g.nk, causal=st.causal, window=st.window)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], dl_ref[...][:, None]

    def body(j, dq):
        sl = pl.ds(j * g.bk, g.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s, t = _scores(q, k, st)
        p = jnp.where(_mask(i, j, qoff, kvlen, g.bq, g.bk, st), jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros((g.bq, st.D), jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dq_call(st: Static, q, k, v, do, lse, delta, meta):
    g, Bn, G = st.fwd, q.shape[0], st.G
    qspec = pl.BlockSpec((None, g.bq, None, st.D), lambda b, h, i: (b, i, h, 0))
    kvspec = pl.BlockSpec((None, g.Sp, None, st.D), lambda b, h, i: (b, 0, _kv_head(h, G), 0))
    rowspec = pl.BlockSpec((None, None, g.bq), lambda b, h, i: (b, h, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(Bn, st.H, g.nq),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, i: (b, 0)), qspec, kvspec, kvspec, qspec, rowspec, rowspec],
        out_specs=qspec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st),
        interpret=st.interpret,
        name="polychip_flash_dq_gpu",
    )(meta, q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
def _dkv_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, st: Static):
    g = st.dkv
    j = pl.program_id(2)
    qoff, kvlen = meta_ref[0], meta_ref[1]
    lo, hi = B_.q_block_range(j, qoff, kvlen, bq=g.bq, bk=g.bk, nq=g.nq, causal=st.causal, window=st.window)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * g.bq, g.bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        lse, delta = lse_ref[sl][:, None], dl_ref[sl][:, None]
        s, t = _scores(q, k, st)                       # [bq, bk]
        p = jnp.where(_mask(i, j, qoff, kvlen, g.bq, g.bk, st), jnp.exp(s - lse), 0.0)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        ds = p * (_dot(do, v, trans_b=True) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + _dot(ds.T.astype(q.dtype), q)
        return dk, dv

    z = jnp.zeros((g.bk, st.D), jnp.float32)
    dk, dv = lax.fori_loop(lo, hi + 1, body, (z, z))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_call(st: Static, q, k, v, do, lse, delta, meta):
    """dK, dV per query head: [B, Sp, H, D] (fp32 when G > 1, summed over the group by the caller)."""
    g, Bn, G = st.dkv, q.shape[0], st.G
    qspec = pl.BlockSpec((None, g.Tp, None, st.D), lambda b, h, j: (b, 0, h, 0))
    kvspec = pl.BlockSpec((None, g.bk, None, st.D), lambda b, h, j: (b, j, _kv_head(h, G), 0))
    rowspec = pl.BlockSpec((None, None, g.Tp), lambda b, h, j: (b, h, 0))
    outspec = pl.BlockSpec((None, g.bk, None, st.D), lambda b, h, j: (b, j, h, 0))
    dt = k.dtype if G == 1 else jnp.float32
    return pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(Bn, st.H, g.nk),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, j: (b, 0)), qspec, kvspec, kvspec, qspec, rowspec, rowspec],
        out_specs=[outspec, outspec],
        out_shape=[jax.ShapeDtypeStruct((Bn, g.Sp, st.H, st.D), dt)] * 2,
        compiler_params=_params(st),
        interpret=st.interpret,
        name="polychip_flash_dkv_gpu",
    )(meta, q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: Static, q, k, v, meta):
    return _fwd_call(st, q, k, v, meta)[0]


def _flash_fwd(st, q, k, v, meta):
    o, lse = _fwd_call(st, q, k, v, meta)
    return o, (q, k, v, o, lse, meta)


def _flash_bwd(st, res, do):
    q, k, v, o, lse, meta = res
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, Tp]
    dq = _dq_call(st, q, k, v, do, lse, delta, meta)
    gd, gf = st.dkv, st.fwd
    pq, pk = gd.Tp - gf.Tp, gd.Sp - gf.Sp
    padt = lambda x, n: x if n == 0 else jnp.pad(x, [(0, 0), (0, n), (0, 0), (0, 0)])  # noqa: E731
    padr = lambda x, n: x if n == 0 else jnp.pad(x, [(0, 0), (0, 0), (0, n)])  # noqa: E731
    dk, dv = _dkv_call(st, padt(q, pq), padt(k, pk), padt(v, pk), padt(do, pq), padr(lse, pq), padr(delta, pq), meta)
    dk, dv = dk[:, :gf.Sp], dv[:, :gf.Sp]
    if st.G > 1:
        Bn = q.shape[0]
        dk = dk.reshape(Bn, gf.Sp, st.K, st.G, st.D).sum(3).astype(k.dtype)
        dv = dv.reshape(Bn, gf.Sp, st.K, st.G, st.D).sum(3).astype(v.dtype)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None,
                    scale=None, block_sizes: BlockSizes | None = None, interpret: bool = False,
                    num_warps: int | None = None, num_stages: int = 2):
    """q [B, T, H, D], k/v [B, S, K, D] (H % K == 0, D a power of two) -> [B, T, H, D]. Differentiable in q, k, v."""
    Bn, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if block_sizes is None:
        block_sizes = pick_blocks(T=T, S=S, H=H, K=K, D=D, dtype=str(q.dtype), causal=causal, window=sliding_window)
    gran = 16  # smallest tile Triton's tensor-core dot takes
    bq, Tp = B_.fit_block(T, block_sizes.bq, gran)
    bk, Sp = B_.fit_block(S, block_sizes.bk, gran)
    bq, bk = B_.next_pow2(bq), B_.next_pow2(bk)
    Tp, Sp = -(-Tp // bq) * bq, -(-Sp // bk) * bk
    bqd = min(B_.next_pow2(block_sizes.bq_dkv), B_.next_pow2(Tp))
    bkd = min(B_.next_pow2(block_sizes.bk_dkv), B_.next_pow2(Sp))
    Tpd, Spd = -(-Tp // bqd) * bqd, -(-Sp // bkd) * bkd
    st = Static(H=H, K=K, D=D, causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
                soft_cap=None if soft_cap is None else float(soft_cap), scale=float(D ** -0.5 if scale is None else scale),
                fwd=Geometry(T, S, bq, bk, Tp, Sp), dkv=Geometry(T, S, bqd, bkd, Tpd, Spd), interpret=bool(interpret),
                num_warps=num_warps or (4 if D <= 64 else 8), num_stages=num_stages)
    qoff = jnp.broadcast_to(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32).reshape(-1), (Bn,))
    kvl = jnp.full((Bn,), S, jnp.int32) if kv_lengths is None else jnp.minimum(
        jnp.asarray(kv_lengths, jnp.int32).reshape(Bn), S)
    meta = jnp.stack([qoff, kvl], axis=1)
    qp = jnp.pad(q, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
    kp = jnp.pad(k, [(0, 0), (0, Sp - S), (0, 0), (0, 0)])
    vp = jnp.pad(v, [(0, 0), (0, Sp - S), (0, 0), (0, 0)])
    return _flash(st, qp, kp, vp, meta)[:, :T]


def pick_blocks(*, T, S, H, K, D, dtype, causal, window, device_kind: str | None = None) -> BlockSizes:
    if device_kind is None:
        try:
            d = jax.devices()[0]
            device_kind = d.device_kind if d.platform == "gpu" else ""
        except RuntimeError:  # pragma: no cover
            device_kind = ""
    key = B_.shape_class(seq=max(T, S), head_dim=D, group=H // K, dtype=dtype, causal=causal, window=window)
    return (B_.tuned_blocks(device_kind, key) if device_kind else None) or B_.default_blocks("gpu", seq=max(T, S),
                                                                                            head_dim=D)


# ---------------------------------------------------------------------------------------------
def _reason(query: dict) -> str | None:
    if query.get("dtype") not in ("bfloat16", "float32", "float16"):
        return f"dtype {query.get('dtype')} not supported (bfloat16, float16, float32)"
    d = query.get("head_dim", 0)
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} not supported (Triton needs a power of two in 16..256)"
    return None


def supported_on(target, query: dict) -> str | None:
    if target.platform != "gpu":
        return f"Pallas GPU (Triton) kernel needs platform gpu, not {target.platform}"
    return _reason(query)


def _attention(q, k, v, **kw):
    return flash_attention(q, k, v, **kw)


if pl is not None:
    from polychip.kernels.registry import register_pallas

    # auto=False until it has run on a GPU: only an explicit override (attention=pallas_gpu) picks it.
    register_pallas("attention", "gpu", _attention, priority=20, supported_on=supported_on,
                    interpret_supported_on=lambda t, q: _reason(q), auto=False,
                    verified="interpret mode in CI (CPU); Triton path not run on a GPU")
