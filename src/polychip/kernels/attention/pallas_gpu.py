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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polychip.kernels.attention import blocks as B_
from polychip.kernels.attention.blocks import BlockSizes, Geometry, Static
from polychip.kernels.common import NEG_INF
from polychip.kernels.pallas_common import gpu_options, is_pow2, next_pow2, pallas_kernels, round_up

pick_blocks = functools.partial(B_.pick_blocks, "gpu")


def _dot(a, b, trans_b=False):
    if a.dtype == jnp.float32:  # fp32 inputs: full fp32, not TF32, to match the reference
        return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False)
    return plgpu.dot(a, b, trans_b=trans_b)


def _scores(q, k, st: Static):
    return B_.scaled_scores(_dot(q, k, trans_b=True), st)


def _mask(i, j, qoff, kvlen, bq, bk, st: Static):
    qpos = (qoff + i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    return B_.allowed(qpos, kpos, kvlen, st)


def _kv_head(h, G):
    return lax.div(h, jnp.int32(G))


def _block_range(meta_ref, st: Static, over_keys: bool):
    """(this program's block index, qoff, kvlen, lo, hi): the inclusive range of key blocks (over_keys)
    or query blocks this program's block needs."""
    g = st.fwd if over_keys else st.dkv
    n = pl.program_id(2)
    qoff, kvlen = meta_ref[0], meta_ref[1]
    kw = dict(bq=g.bq, bk=g.bk, causal=st.causal, window=st.window)
    if over_keys:
        return (n, qoff, kvlen, *B_.kv_block_range(n, qoff, kvlen, nk=g.nk, **kw))
    return (n, qoff, kvlen, *B_.q_block_range(n, qoff, kvlen, nq=g.nq, **kw))


def _call(kernel, st: Static, name: str, grid, in_specs, out_specs, out_shape, *args):
    """pallas_call with the per-sequence [q_offset, kv_length] row (args[0]) as the first input."""
    meta = pl.BlockSpec((None, 2), lambda b, h, n: (b, 0))
    return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=[meta, *in_specs],
                          out_specs=out_specs, out_shape=out_shape, name=name,
                          **gpu_options(st.interpret, st.num_warps, st.num_stages))(*args)


# ---------------------------------------------------------------------------------------------
def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: Static):
    g = st.fwd
    i, qoff, kvlen, lo, hi = _block_range(meta_ref, st, over_keys=True)
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


def _fwd_specs(st: Static):
    """(query/output spec, whole-sequence key/value spec, lse/delta row spec) of the grid (b, h, i)."""
    g, G = st.fwd, st.G
    return (pl.BlockSpec((None, g.bq, None, st.D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, g.Sp, None, st.D), lambda b, h, i: (b, 0, _kv_head(h, G), 0)),
            pl.BlockSpec((None, None, g.bq), lambda b, h, i: (b, h, i)))


def _fwd_call(st: Static, q, k, v, meta):
    g, Bn = st.fwd, q.shape[0]
    qspec, kvspec, rowspec = _fwd_specs(st)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((Bn, st.H, g.Tp), jnp.float32)]
    return _call(_fwd_kernel, st, "polychip_flash_fwd_gpu", (Bn, st.H, g.nq), [qspec, kvspec, kvspec],
                 [qspec, rowspec], out_shape, meta, q, k, v)


# ---------------------------------------------------------------------------------------------
def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, st: Static):
    g = st.fwd
    i, qoff, kvlen, lo, hi = _block_range(meta_ref, st, over_keys=True)
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
    qspec, kvspec, rowspec = _fwd_specs(st)
    return _call(_dq_kernel, st, "polychip_flash_dq_gpu", (q.shape[0], st.H, st.fwd.nq),
                 [qspec, kvspec, kvspec, qspec, rowspec, rowspec], qspec, jax.ShapeDtypeStruct(q.shape, q.dtype),
                 meta, q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
def _dkv_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, st: Static):
    g = st.dkv
    j, qoff, kvlen, lo, hi = _block_range(meta_ref, st, over_keys=False)
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
    return _call(_dkv_kernel, st, "polychip_flash_dkv_gpu", (Bn, st.H, g.nk),
                 [qspec, kvspec, kvspec, qspec, rowspec, rowspec], [outspec, outspec],
                 [jax.ShapeDtypeStruct((Bn, g.Sp, st.H, st.D), dt)] * 2, meta, q, k, v, do, lse, delta)


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
    bq, bk = next_pow2(bq), next_pow2(bk)
    Tp, Sp = round_up(Tp, bq), round_up(Sp, bk)
    bqd = min(next_pow2(block_sizes.bq_dkv), next_pow2(Tp))
    bkd = min(next_pow2(block_sizes.bk_dkv), next_pow2(Sp))
    st = Static.create(q, k, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap, scale=scale,
                       fwd=Geometry(T, S, bq, bk, Tp, Sp),
                       dkv=Geometry(T, S, bqd, bkd, round_up(Tp, bqd), round_up(Sp, bkd)),
                       interpret=interpret, num_warps=num_warps or (4 if D <= 64 else 8), num_stages=num_stages)
    meta = jnp.stack(B_.offsets_and_lengths(Bn, S, q_offset, kv_lengths), axis=1)
    qp = jnp.pad(q, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
    kp = jnp.pad(k, [(0, 0), (0, Sp - S), (0, 0), (0, 0)])
    vp = jnp.pad(v, [(0, 0), (0, Sp - S), (0, 0), (0, 0)])
    return _flash(st, qp, kp, vp, meta)[:, :T]


# ---------------------------------------------------------------------------------------------
def _reason(query: dict) -> str | None:
    if query.get("dtype") not in ("bfloat16", "float32", "float16"):
        return f"dtype {query.get('dtype')} not supported (bfloat16, float16, float32)"
    d = query.get("head_dim", 0)
    if d < 16 or d > 256 or not is_pow2(d):
        return f"head_dim {d} not supported (Triton needs a power of two in 16..256)"
    return None


# auto=False until it has run on a GPU: only an explicit override (attention=pallas_gpu) picks it.
KERNELS = pallas_kernels("gpu", flash_attention, priority=20, shape_reason=_reason, auto=False,
                         verified="interpret mode in CI (CPU); Triton path not run on a GPU")
