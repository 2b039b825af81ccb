"""Context-parallel attention: the sequence split over the `context` mesh axis (long context).

Each device holds a chunk of T/C consecutive queries and keys (C = context ways). Per shard, the
chunk's keys and values are all-gathered over `context` (K/V are the small side under GQA: K heads,
not H), and the queries attend to the whole sequence with their absolute position as the query offset
(chunk index x T/C, plus any offset the caller gave), so the causal mask and sliding window see global
positions and the result equals unsplit attention. The backward of the all-gather is a
reduce-scatter of dK/dV. Any registered implementation runs the per-shard attention (picked for the
chunk's query: q_len T/C, keys T, a query offset), so on TPU the flash kernel keeps memory linear in T.

Cost and what is left: each chunk computes scores against all T keys, though causally chunk i needs
only the first (i+1)/C of them (C-chunk imbalance; a zig-zag split or ring attention with ppermute
would balance it and overlap the exchange), and the gathered K/V [B, T, K, Dh] is held per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from polychip.kernels.registry import SeqSplit


def _wrap(call, arrays: dict, axes: tuple[str, ...]):
    q = arrays["q"]
    k = jax.lax.all_gather(arrays["k"], axes, axis=1, tiled=True)
    v = jax.lax.all_gather(arrays["v"], axes, axis=1, tiled=True)
    offset = jax.lax.axis_index(axes).astype(jnp.int32) * q.shape[1]
    if arrays.get("q_offset") is not None:
        offset = arrays["q_offset"] + offset
    return call({**arrays, "k": k, "v": v, "q_offset": offset})


def _query(query: dict, ways: int) -> dict:
    return {**query, "q_len": query["q_len"] // ways, "has_q_offset": True}


SEQ_SPLIT = SeqSplit(wrap=_wrap, query=_query)
