"""paged_attention: one decode query per sequence against a paged KV cache; registry-selected.

Cache layout (build the serving cache to match; the same layout as JAX's Pallas paged-attention ops):

    k_pages, v_pages  [K, P, page_size, D]   K = kv heads, P = total physical pages (a shared pool)
    block_tables      [B, max_pages] int32   block_tables[b, i] = physical page holding tokens
                                             i*page_size .. (i+1)*page_size-1 of sequence b
    lengths           [B] int32              valid tokens of sequence b (the new token included,
                                             i.e. write its K/V into the cache before calling)

Token t of sequence b lives at k_pages[:, block_tables[b, t // page_size], t % page_size, :].
Positions >= lengths[b] are masked; table entries past cdiv(lengths[b], page_size) are never read
for compute and may hold any valid page id (0 is fine); lengths[b] == 0 gives zeros. One cache per
layer (stack layers outside). Query heads: q [B, H, D] with H % K == 0, query head h reads kv head
h // (H // K) (GQA/MQA; K/V are never repeated). Softmax in float32; soft_cap maps logits to
cap * tanh(logits / cap); scale defaults to D ** -0.5. Output [B, H, D] in q's dtype.

Implementations (lower first; interpret variants sit after the reference, override-only):
  10 pallas_tpu            Mosaic, scalar-prefetched block table      deviceless-compiled in CI
  20 pallas_gpu            Triton                                     unverified on a GPU
 100 reference             gather pages + masked softmax (float32)    the ground truth
 200 pallas_tpu_interpret / 210 pallas_gpu_interpret                  executed in CI (CPU)
"""
from __future__ import annotations


from polychip.kernels.paged_attention import reference
from polychip.kernels.registry import KernelPolicy, optional_backend, register, register_pallas

OP = "paged_attention"
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.paged_attention)

for _backend, _priority, _auto in (("tpu", 10, True), ("gpu", 20, False)):  # GPU: not yet run on a GPU
    _mod = optional_backend(f"polychip.kernels.paged_attention.pallas_{_backend}")
    if _mod is not None:
        register_pallas(OP, _backend, _mod.paged_attention, priority=_priority, supported_on=_mod.supported_on,
                        interpret_supported_on=_mod.interpret_supported_on, auto=_auto,
                        verified={"tpu": 'TPU interpret mode on CPU + deviceless compile for TPU topologies in CI; not run on a TPU', "gpu": 'unverified on GPU hardware (not yet run on a GPU); interpret mode executed in CI (CPU)'}[_backend])


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, policy: KernelPolicy, soft_cap=None, scale=None):
    """q [B, H, D], k_pages/v_pages [K, P, page_size, D], block_tables [B, max_pages] int32,
    lengths [B] int32 -> [B, H, D] (layout in the module docstring)."""
    B, H, D = q.shape
    K, P, ps, Dk = k_pages.shape
    if Dk != D or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} do not match q head_dim {D}")
    if H % K:
        raise ValueError(f"query heads {H} not a multiple of kv heads {K}")
    if block_tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_tables {block_tables.shape} / lengths {lengths.shape} do not match batch {B}")
    impl = policy.pick(OP, batch=B, n_heads=H, n_kv_heads=K, head_dim=D, page_size=ps, total_pages=P,
                       max_pages=block_tables.shape[1], dtype=str(q.dtype), soft_cap=soft_cap)
    return impl.fn(q, k_pages, v_pages, block_tables, lengths, soft_cap=soft_cap, scale=scale)
