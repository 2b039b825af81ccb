"""Flash attention for TPU in Pallas (Mosaic): forward, and a backward of two kernels (dQ; dK+dV).

Layout inside the kernels is head-major: q/o/dO [B, H, Tp, D], k/v [B, K, Sp, D]; the wrapper
transposes from the API's [B, T, H, D] and pads T, S up to whole blocks. GQA/MQA: the key/value
BlockSpec index map reads kv head h // G, so K/V are never repeated in memory; the dK/dV kernel
walks the G query heads of its kv head as a reduction axis of the grid.

Per-sequence query offset and valid key length ([B] int32, may be traced) ride in SMEM as scalar
prefetch, so the index maps can clamp the key-block index to the blocks a query block needs
(causal / window / length block skipping: a repeated block index makes Pallas skip the DMA, and the
kernel body skips the compute). Blocks entirely inside the allowed region skip the mask too.

Residuals for the backward: the output and the row logsumexp (fp32, stored as [B, H, 1, Tp] so the
dK/dV kernel, which computes scores transposed [bk, bq], reads it as a lane row).

Forward: s = scale * q k^T, optionally cap * tanh(s / cap); online softmax over key blocks.
Backward: p = exp(s - lse); dv += p^T dO; dp = dO v^T; ds = p * (dp - delta), delta = rowsum(dO * o);
soft-cap chain rule ds *= 1 - tanh^2; dq += scale * ds k; dk += scale * ds^T q.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polychip.kernels.attention import blocks as B_
from polychip.kernels.attention.blocks import BlockSizes, Geometry, Static
from polychip.kernels.common import NEG_INF
from polychip.kernels.pallas_common import pallas_kernels, tpu_options

GRANULE = 16     # sublane tile covering fp32 (8) and bf16 (16)
NT = (((1,), (1,)), ((), ()))  # contract last dims: a @ b.T
NN = (((1,), (0,)), ((), ()))
TN = (((0,), (0,)), ((), ()))  # a.T @ b
pick_blocks = functools.partial(B_.pick_blocks, "tpu")


def _dot(a, b, dims):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _scores(q, k, st: Static, transposed: bool):
    """[bq, bk] (or [bk, bq] when transposed) scaled, soft-capped fp32 logits; also tanh for the bwd."""
    return B_.scaled_scores(_dot(k, q, NT) if transposed else _dot(q, k, NT), st)


def _mask(shape, i, j, qoff, kvlen, g: Geometry, st: Static, transposed: bool):
    """Boolean mask of allowed pairs for block (i, j); shape [bq, bk] or [bk, bq] if transposed."""
    qa, ka = (1, 0) if transposed else (0, 1)
    qpos = qoff + i * g.bq + lax.broadcasted_iota(jnp.int32, shape, qa)
    kpos = j * g.bk + lax.broadcasted_iota(jnp.int32, shape, ka)
    return B_.allowed(qpos, kpos, kvlen, st)


def _ranges(g: Geometry, st: Static):
    kw = dict(bq=g.bq, bk=g.bk, causal=st.causal, window=st.window)
    kv_range = functools.partial(B_.kv_block_range, nk=g.nk, **kw)
    q_range = functools.partial(B_.q_block_range, nq=g.nq, **kw)
    full = functools.partial(B_.block_is_full, **kw)
    return kv_range, q_range, full


def _visitor(run, full):
    """visit(body): body(masked) under `run`, with the mask only on blocks that are not entirely allowed."""
    def visit(body):
        @pl.when(run & full)
        def _():
            body(False)

        @pl.when(run & jnp.logical_not(full))
        def _():
            body(True)

    return visit


def _kv_program(qoff_ref, kvl_ref, st: Static):
    """A forward / dQ program (b, h, i, j) -> (i, j, qoff, kvlen, visit): visit runs when query block i
    needs key block j."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qoff, kvlen = qoff_ref[b], kvl_ref[b]
    kv_range, _, full_fn = _ranges(st.fwd, st)
    lo, hi = kv_range(i, qoff, kvlen)
    return i, j, qoff, kvlen, _visitor((j >= lo) & (j <= hi), full_fn(i, j, qoff, kvlen))


def _kv_specs(st: Static):
    """(query-row spec, key/value spec with blocks clamped to those needed, lse/delta row spec) of the
    forward / dQ grid (b, h, i, j)."""
    g, G = st.fwd, st.G
    kv_range, _, _ = _ranges(g, st)

    def kv_map(b, h, i, j, qoff_ref, kvl_ref):
        lo, hi = kv_range(i, qoff_ref[b], kvl_ref[b])
        return b, lax.div(h, jnp.int32(G)), B_.clamp_index(j, lo, hi, g.nk), 0

    qspec = pl.BlockSpec((None, None, g.bq, st.D), lambda b, h, i, j, *_: (b, h, i, 0))
    rowspec = pl.BlockSpec((None, None, 1, g.bq), lambda b, h, i, j, *_: (b, h, 0, i))
    return qspec, pl.BlockSpec((None, None, g.bk, st.D), kv_map), rowspec


def _cost(st: Static, g: Geometry, Bn: int, matmuls: int, bytes_accessed):
    """Block-exact estimate (Mosaic kernels are opaque to XLA's cost model): `matmuls` [bq, bk, D]
    products per visited block pair; bytes_accessed(visited pairs per head)."""
    n_pairs = B_.visited_pairs(g, causal=st.causal, window=st.window)
    return pl.CostEstimate(flops=Bn * st.H * n_pairs * 2 * matmuls * g.bq * g.bk * st.D,
                           transcendentals=Bn * st.H * n_pairs * g.bq * g.bk, bytes_accessed=bytes_accessed(n_pairs))


def _call(kernel, st: Static, name: str, grid, specs, scratch, out_shape, cost, *args):
    """pallas_call with the query offsets and key lengths (args[:2]) as scalar prefetch; every grid
    axis parallel but the reductions after the first three."""
    in_specs, out_specs = specs
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape, cost_estimate=cost, name=name,
        **tpu_options(st.interpret, *("parallel",) * 3, *("arbitrary",) * (len(grid) - 3)),
    )(*args)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(qoff_ref, kvl_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st: Static):
    g = st.fwd
    i, j, qoff, kvlen, visit = _kv_program(qoff_ref, kvl_ref, st)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @visit
    def _(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s, _ = _scores(q, k, st, transposed=False)
        if masked:
            mask = _mask(s.shape, i, j, qoff, kvlen, g, st, transposed=False)
            s = jnp.where(mask, s, NEG_INF)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_next)
        if masked:  # rows with no allowed key so far have m_next = NEG_INF and exp(0) = 1
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, NN)

    @pl.when(j == g.nk - 1)
    def _():
        l = l_sc[...]
        safe = jnp.where(l == 0.0, 1.0, l)  # a row with no allowed key outputs 0 (as the reference)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse = m_sc[...] + jnp.log(safe)                     # [bq, 1]
        lse_ref[...] = jnp.broadcast_to(lse, (g.bq, 128)).T[:1, :]  # column -> lane row [1, bq]


def _fwd_call(st: Static, q, k, v, qoff, kvl):
    g, Bn, isz = st.fwd, q.shape[0], q.dtype.itemsize
    qspec, kvspec, rowspec = _kv_specs(st)
    cost = _cost(st, g, Bn, 2, lambda n: Bn * st.H * (2 * g.Tp * st.D * isz + g.Tp * 4 + n * 2 * g.bk * st.D * isz))
    scratch = [pltpu.VMEM((g.bq, 1), jnp.float32), pltpu.VMEM((g.bq, 1), jnp.float32),
               pltpu.VMEM((g.bq, st.D), jnp.float32)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((Bn, st.H, 1, g.Tp), jnp.float32)]
    return _call(_fwd_kernel, st, "polychip_flash_fwd", (Bn, st.H, g.nq, g.nk),
                 ([qspec, kvspec, kvspec], [qspec, rowspec]), scratch, out_shape, cost, qoff, kvl, q, k, v)


# ---------------------------------------------------------------------------------------------
# Backward: dQ (grid over query blocks, reduction over key blocks)
# ---------------------------------------------------------------------------------------------
def _dq_kernel(qoff_ref, kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_sc, *, st: Static):
    g = st.fwd
    i, j, qoff, kvlen, visit = _kv_program(qoff_ref, kvl_ref, st)

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @visit
    def _(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse = jnp.expand_dims(lse_ref[0], -1)   # [bq, 1]
        delta = jnp.expand_dims(dl_ref[0], -1)
        s, t = _scores(q, k, st, transposed=False)
        p = jnp.exp(s - lse)
        if masked:
            p = jnp.where(_mask(s.shape, i, j, qoff, kvlen, g, st, transposed=False), p, 0.0)
        dp = _dot(do, v, NT)
        ds = p * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, NN)

    @pl.when(j == g.nk - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * st.scale).astype(dq_ref.dtype)


def _dq_call(st: Static, q, k, v, do, lse, delta, qoff, kvl):
    g, Bn, isz = st.fwd, q.shape[0], q.dtype.itemsize
    qspec, kvspec, rowspec = _kv_specs(st)
    cost = _cost(st, g, Bn, 3,
                 lambda n: Bn * st.H * (3 * g.Tp * st.D * isz + 2 * g.Tp * 4 + n * 2 * g.bk * st.D * isz))
    return _call(_dq_kernel, st, "polychip_flash_dq", (Bn, st.H, g.nq, g.nk),
                 ([qspec, kvspec, kvspec, qspec, rowspec, rowspec], qspec), [pltpu.VMEM((g.bq, st.D), jnp.float32)],
                 jax.ShapeDtypeStruct(q.shape, q.dtype), cost, qoff, kvl, q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
# Backward: dK, dV (grid over key blocks; reduction over the G query heads and the query blocks)
# ---------------------------------------------------------------------------------------------
def _dkv_kernel(qoff_ref, kvl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc,
                *, st: Static):
    g = st.dkv
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    qoff, kvlen = qoff_ref[b], kvl_ref[b]
    _, q_range, full_fn = _ranges(g, st)
    lo, hi = q_range(j, qoff, kvlen)

    @pl.when((gi == 0) & (i == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @_visitor((i >= lo) & (i <= hi), full_fn(i, j, qoff, kvlen))
    def _(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse, delta = lse_ref[...], dl_ref[...]          # [1, bq] lane rows
        s, t = _scores(q, k, st, transposed=True)        # [bk, bq]
        p = jnp.exp(s - lse)
        if masked:
            p = jnp.where(_mask(s.shape, i, j, qoff, kvlen, g, st, transposed=True), p, 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, NN)
        dp = _dot(v, do, NT)                             # [bk, bq]
        ds = p * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk_sc[...] += _dot(ds.astype(q.dtype), q, NN)

    @pl.when((gi == st.G - 1) & (i == g.nq - 1))
    def _():
        dk_ref[...] = (dk_sc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv_call(st: Static, q, k, v, do, lse, delta, qoff, kvl):
    g, Bn, G, isz = st.dkv, q.shape[0], st.G, q.dtype.itemsize
    _, q_range, _ = _ranges(g, st)

    def qi(j, i, b, qoff_ref, kvl_ref):
        lo, hi = q_range(j, qoff_ref[b], kvl_ref[b])
        return B_.clamp_index(i, lo, hi, g.nq)

    qspec = pl.BlockSpec((None, None, g.bq, st.D),
                         lambda b, kh, j, gi, i, qo, kl: (b, kh * G + gi, qi(j, i, b, qo, kl), 0))
    rowspec = pl.BlockSpec((None, None, 1, g.bq),
                           lambda b, kh, j, gi, i, qo, kl: (b, kh * G + gi, 0, qi(j, i, b, qo, kl)))
    kvspec = pl.BlockSpec((None, None, g.bk, st.D), lambda b, kh, j, gi, i, *_: (b, kh, j, 0))
    cost = _cost(st, g, Bn, 4, lambda n: Bn * st.K * 4 * g.Sp * st.D * isz
                 + Bn * st.H * n * (2 * g.bq * st.D * isz + 2 * g.bq * 4))
    scratch = [pltpu.VMEM((g.bk, st.D), jnp.float32), pltpu.VMEM((g.bk, st.D), jnp.float32)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _call(_dkv_kernel, st, "polychip_flash_dkv", (Bn, st.K, g.nk, G, g.nq),
                 ([qspec, kvspec, kvspec, qspec, rowspec, rowspec], [kvspec, kvspec]), scratch, out_shape, cost,
                 qoff, kvl, q, k, v, do, lse, delta)


# ---------------------------------------------------------------------------------------------
# custom_vjp on the padded, head-major problem
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: Static, q, k, v, qoff, kvl):
    return _fwd_call(st, q, k, v, qoff, kvl)[0]


def _flash_fwd(st, q, k, v, qoff, kvl):
    o, lse = _fwd_call(st, q, k, v, qoff, kvl)
    return o, (q, k, v, o, lse, qoff, kvl)


def _flash_bwd(st, res, do):
    q, k, v, o, lse, qoff, kvl = res
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B,H,1,Tp]
    dq = _dq_call(st, q, k, v, do, lse, delta, qoff, kvl)
    # The dK/dV kernel may use other block sizes: re-pad the padded problem to its geometry.
    gd, gf = st.dkv, st.fwd
    pq, pk = gd.Tp - gf.Tp, gd.Sp - gf.Sp
    padq = lambda x, n: x if n == 0 else jnp.pad(x, [(0, 0), (0, 0), (0, n), (0, 0)])  # noqa: E731
    padr = lambda x, n: x if n == 0 else jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, n)])  # noqa: E731
    dk, dv = _dkv_call(st, padq(q, pq), padq(k, pk), padq(v, pk), padq(do, pq), padr(lse, pq), padr(delta, pq),
                       qoff, kvl)
    return dq, dk[:, :, :gf.Sp], dv[:, :, :gf.Sp], None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None,
                    scale=None, block_sizes: BlockSizes | None = None, interpret: bool = False,
                    device_kind: str | None = None):
    """q [B, T, H, D], k/v [B, S, K, D] (H % K == 0) -> [B, T, H, D] in q's dtype. Differentiable in q, k, v.

    q_offset: int or [B] int (may be traced); kv_lengths: [B] int (may be traced). `interpret` runs
    Mosaic's TPU interpreter (CPU); `device_kind` picks the tuned block-size file."""
    Bn, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if block_sizes is None:
        block_sizes = pick_blocks(T=T, S=S, H=H, K=K, D=D, dtype=str(q.dtype), causal=causal,
                                  window=sliding_window, device_kind=device_kind or None)
    bq, Tp = B_.fit_block(T, block_sizes.bq, GRANULE)
    bk, Sp = B_.fit_block(S, block_sizes.bk, GRANULE)
    bqd, Tpd = B_.fit_block(Tp, block_sizes.bq_dkv, GRANULE)
    bkd, Spd = B_.fit_block(Sp, block_sizes.bk_dkv, GRANULE)
    st = Static.create(q, k, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap, scale=scale,
                       fwd=Geometry(T, S, bq, bk, Tp, Sp),
                       dkv=Geometry(T, S, bqd, bkd, max(Tpd, Tp), max(Spd, Sp)), interpret=interpret)
    qoff, kvl = B_.offsets_and_lengths(Bn, S, q_offset, kv_lengths)
    qt = jnp.pad(q.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, Tp - T), (0, 0)])
    kt = jnp.pad(k.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, Sp - S), (0, 0)])
    vt = jnp.pad(v.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, Sp - S), (0, 0)])
    o = _flash(st, qt, kt, vt, qoff, kvl)
    return o[:, :, :T].transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
_DTYPES = ("bfloat16", "float32")
MAX_HEAD_DIM = 256


def _common_reason(query: dict) -> str | None:
    if query.get("dtype") not in _DTYPES:
        return f"dtype {query.get('dtype')} not supported (bfloat16, float32)"
    d = query.get("head_dim", 0)
    if d > MAX_HEAD_DIM or d % 8:
        return f"head_dim {d} not supported (a multiple of 8, at most {MAX_HEAD_DIM})"
    return None


KERNELS = pallas_kernels("tpu", flash_attention, priority=10, shape_reason=_common_reason, wants_device_kind=True,
                         verified="interpret mode in CI (CPU); compiled deviceless for v5e/v6e/tpu7x; not run on a TPU")
