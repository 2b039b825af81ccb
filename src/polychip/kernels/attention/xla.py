"""XLA paths (no hand-written kernel):

- `attention`: the reference's math (grouped GQA, scores/softmax in float32) at default matmul
  precision, laid out so every product is a plain batched GEMM. Runs everywhere, handles every
  option (traced q_offset too). See `attention` for how it differs in form from the reference.
- `sdpa`: `jax.nn.dot_product_attention` (implementation=None: XLA, or cuDNN flash attention on NVIDIA
  GPUs). Auto-picked only on GPU: on CPU its backward measured ~2x slower than the einsum path for
  the `small` preset (GQA K/V get repeated), and on TPU the Pallas kernel is preferred.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from polychip.kernels.attention.reference import attention_mask
from polychip.kernels.common import NEG_INF
from polychip.kernels.registry import kernel


F32 = jnp.float32
# Causal self-attention is split into this many query blocks (see _query_blocks): 62.5% of the dense
# score work; the `small` preset's attention fwd+bwd measured 1.5x faster on CPU than one block (8
# blocks were no faster), and a fixed count keeps the traced program's size independent of T.
QUERY_BLOCKS = 4


def attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None,
              scale=None, query_block=None):
    """q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D] in q's dtype; the reference's semantics.

    Differs from the reference in form only:
    - Causal self-attention (no query offset) runs as QUERY_BLOCKS query blocks, each against only
      the keys it can see, so most of the masked upper triangle is never computed.
    - Memory-efficient backward (Rabe & Staats 2021; FlashAttention, Dao et al. 2022, section 3.1):
      a custom VJP saves q, k, v, the output and the per-row log-sum-exp, and recomputes the
      probabilities in the backward pass, so no [B, H, T, S] tensor outlives the layer. Under the
      layer scan those tensors were stacked over layers (zero-filled, written and re-read each
      step) and dominated the CPU train step; the price is one extra QK^T product in the backward.
      Its backward also uses dS = P * (dP - rowsum(dO * O)), a [.., T, D] reduction instead of one
      over the scores.
    - Heads are moved in front of time on the small q/k/v/o tensors ([B, K, G*T, D], the G query
      heads of a group stacked as rows), so every product is a batched GEMM over (b, k) and no
      score-sized tensor is transposed (the reference's "btkgd" order made XLA copy probabilities
      into [b, k, t, g, s] for the PV product).
    - The softmax is normalised after the PV product (on [.., T, D] instead of [.., T, S]). Masked
      scores are NEG_INF before exp and a row with no allowed key uses 0 as its max, so its exp() is
      exactly 0 and its output 0, as in the reference, without a second mask pass.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    mask = attention_mask(T, S, q_offset, causal, sliding_window, kv_lengths)  # [B|1, T, S]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    query_block = -(-T // QUERY_BLOCKS) if query_block is None else query_block
    outs = []
    for t0, t1, lo, hi in _query_blocks(T, S, causal and q_offset is None, sliding_window, query_block):
        o = _attend(_heads_first(q[:, t0:t1], K), kh[:, :, lo:hi], vh[:, :, lo:hi], mask[:, t0:t1, lo:hi],
                    scale, soft_cap)
        outs.append(_heads_last(o, H // K))
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)).astype(q.dtype)


def _query_blocks(T, S, causal_from_zero, sliding_window, query_block):
    """[(t0, t1, lo, hi)]: query rows [t0, t1) and the key columns [lo, hi) they can see.

    Without causal structure known at trace time (a query offset, or not causal) that is one block
    over everything. With queries at positions 0..T-1, query block [t0, t1) sees keys < t1 (and,
    under a sliding window W, > t0 - W), so the fully masked upper triangle is never computed:
    n blocks do (n + 1) / (2n) of the dense score work."""
    if not causal_from_zero or query_block >= T:
        return [(0, T, 0, S)]
    out = []
    for t0 in range(0, T, query_block):
        t1 = min(T, t0 + query_block)
        lo = 0 if sliding_window is None else max(0, t0 - sliding_window + 1)
        out.append((t0, t1, lo, min(S, t1)))
    if any(hi <= lo for _, _, lo, hi in out):  # more queries than keys: keep the plain form
        return [(0, T, 0, S)]
    return out


def _heads_first(x, K):
    """[B, T, H, D] -> [B, K, G*T, D] (query head h = k*G + g, row g*T + t)."""
    B, T, H, D = x.shape
    return x.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4).reshape(B, K, (H // K) * T, D)


def _heads_last(x, G):
    """[B, K, G*T, D] -> [B, T, K*G, D]."""
    B, K, M, D = x.shape
    T = M // G
    return x.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _scores(qh, kh, mask, scale, soft_cap):
    """-> (masked scores [B, K, G, T, S] float32, soft-capped scores before masking or None)."""
    B, K, M, _ = qh.shape
    T, S = mask.shape[-2], kh.shape[2]
    s = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=F32).reshape(B, K, M // T, T, S) * scale
    capped = None
    if soft_cap is not None:
        s = capped = soft_cap * jnp.tanh(s / soft_cap)
    return jnp.where(mask[:, None, None], s, NEG_INF), capped


def _pv(p, vh):
    """p [B, K, G, T, S] float32, vh [B, K, S, D] -> [B, K, G*T, D] float32."""
    B, K, G, T, S = p.shape
    p = p.reshape(B, K, G * T, S)
    return jnp.einsum("bkms,bksd->bkmd", p.astype(vh.dtype) if vh.dtype != F32 else p, vh, preferred_element_type=F32)


def _forward(qh, kh, vh, mask, scale, soft_cap):
    """-> (o [B, K, G*T, D] float32, lse [B, K, G, T, 1] float32)."""
    s, _ = _scores(qh, kh, mask, scale, soft_cap)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m > NEG_INF / 2, m, 0.0)  # fully masked row: exp(NEG_INF - 0) == 0
    e = jnp.exp(s - m)
    denom = jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(F32).tiny)
    B, K, G, T, _ = s.shape
    o = (_pv(e, vh).reshape(B, K, G, T, -1) / denom).reshape(B, K, G * T, -1)
    return o, m + jnp.log(denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(qh, kh, vh, mask, scale, soft_cap):
    return _forward(qh, kh, vh, mask, scale, soft_cap)[0].astype(qh.dtype)


def _attend_fwd(qh, kh, vh, mask, scale, soft_cap):
    o, lse = _forward(qh, kh, vh, mask, scale, soft_cap)
    o = o.astype(qh.dtype)
    return o, (qh, kh, vh, mask, o, lse)


def _attend_bwd(scale, soft_cap, res, do):
    qh, kh, vh, mask, o, lse = res
    s, capped = _scores(qh, kh, mask, scale, soft_cap)
    p = jnp.exp(s - lse)  # masked entries: exp(NEG_INF - lse) == 0
    B, K, G, T, S = p.shape
    do32 = do.astype(F32)
    di = jnp.sum(do32 * o.astype(F32), axis=-1).reshape(B, K, G, T, 1)
    dp = jnp.einsum("bkmd,bksd->bkms", do, vh, preferred_element_type=F32).reshape(p.shape)
    ds = p * (dp - di)
    if soft_cap is not None:
        ds = ds * (1.0 - jnp.square(capped / soft_cap))
    ds = (ds * scale).reshape(B, K, G * T, S)
    dsc = ds.astype(qh.dtype) if qh.dtype != F32 else ds
    dq = jnp.einsum("bkms,bksd->bkmd", dsc, kh, preferred_element_type=F32)
    dk = jnp.einsum("bkms,bkmd->bksd", dsc, qh, preferred_element_type=F32)
    pm = p.reshape(B, K, G * T, S)
    dv = jnp.einsum("bkms,bkmd->bksd", pm.astype(do.dtype) if do.dtype != F32 else pm, do,
                    preferred_element_type=F32)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def sdpa(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None, scale=None):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_lengths,
    )


def sdpa_supported_on(target, query) -> str | None:
    if target.platform != "gpu":
        return "auto-selected on GPU only (cuDNN); elsewhere the einsum path is as fast or faster"
    return sdpa_supports(query)


def sdpa_supports(query) -> str | None:
    if query.get("soft_cap") is not None:
        return "logit soft-cap is not supported by jax.nn.dot_product_attention"
    if query.get("has_q_offset"):
        return "a query offset (decoding against a cache) is not supported"
    if query.get("q_len") != query.get("kv_len") and query.get("causal", True):
        return "causal masking with q_len != kv_len is not supported"
    return None


KERNELS = (
    kernel("sdpa", sdpa, priority=40, supported_on=sdpa_supported_on,
           verified="CPU path executed in CI; cuDNN dispatch needs a GPU (not in CI)"),
    kernel("xla", attention, priority=50, verified="executed in CI (CPU)"),
)
