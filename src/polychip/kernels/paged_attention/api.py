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
from polychip.kernels.registry import KernelPolicy, declare

# Per shard on a mesh: each device takes its sequences (with their block tables and lengths) and the
# kv heads of its query heads; the page pool is shared by all sequences, so it is never split by page.
OP = declare("paged_attention", reference=reference.paged_attention, backends=("pallas_tpu", "pallas_gpu"),
             args={"q": ("batch", "act_heads", None), "k_pages": ("act_heads", None, None, None),
                   "v_pages": ("act_heads", None, None, None), "block_tables": ("batch", None),
                   "lengths": ("batch",)})


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, policy: KernelPolicy, soft_cap=None, scale=None):
    """q [B, H, D], k_pages/v_pages [K, P, page_size, D], block_tables [B, max_pages] int32,
    lengths [B] int32 -> [B, H, D] (layout in the module docstring)."""
    d = reference.Dims.of(q, k_pages, block_tables, scale)
    if k_pages.shape[3] != d.D or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} do not match q head_dim {d.D}")
    if d.H % d.K:
        raise ValueError(f"query heads {d.H} not a multiple of kv heads {d.K}")
    if block_tables.shape[0] != d.B or lengths.shape != (d.B,):
        raise ValueError(f"block_tables {block_tables.shape} / lengths {lengths.shape} do not match batch {d.B}")
    query = dict(batch=d.B, n_heads=d.H, n_kv_heads=d.K, head_dim=d.D, page_size=d.ps, total_pages=d.P,
                 max_pages=d.M, dtype=str(q.dtype), soft_cap=soft_cap)
    return policy.call(OP, q, k_pages, v_pages, block_tables, lengths, query=query, soft_cap=soft_cap, scale=scale)
