"""The model step over a paged KV cache: one jitted function for decode ([B, 1]) and prefill chunks
([B, T]), compiled once per shape bucket. `jit_step` is the one builder of it: the engine's runner
calls it, and `polychip compile --mode serve` lowers what it returns for a target mesh.

Cache layout (matches polychip.kernels.paged_attention): {"k", "v"}: [L, K, P, page_size, Dh]
(layers, kv heads, pages, slot in page, head dim). A sequence's token at absolute position p lives
in page block_table[p // page_size], slot p % page_size. Page 0 is scratch (see kv_cache.py).

Decode attention goes to the kernel registry's `paged_attention` (its reference implementation
gathers pages in plain jnp where no hand-written kernel supports the device). Prefill chunks gather
the sequence's pages into a contiguous view and call the registry's `attention`: their cost is
amortised over T query tokens.

The block is transformer.block itself; only its `attend` (the cache write and the attention read)
is the paged one here, because positions and lengths are per row.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from polychip.config import ModelConfig
from polychip.infer import MAX_LOGPROBS, sample
from polychip.kernels.attention import attention
from polychip.kernels.paged_attention import paged_attention
from polychip.model import transformer as T
from polychip.model.rope import inv_frequencies

#: Logical axes of the paged cache: pages are a pool shared by every sequence, so they are not
#: split by batch; kv heads follow the attention weights (tensor-parallel).
PAGE_AXES = ("layers", "kv_heads", None, None, "head_dim")


def _gather(pages, block_tables):
    """pages [K, P, ps, D], block_tables [B, M] -> [B, M*ps, K, D] (the sequences' keys in order)."""
    K, _, ps, D = pages.shape
    B, M = block_tables.shape
    g = pages[:, block_tables]  # [K, B, M, ps, D]
    return g.reshape(K, B, M * ps, D).transpose(1, 2, 0, 3)


def init_pages(cfg: ModelConfig, num_blocks: int, page_size: int, dtype=jnp.float32) -> dict:
    shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks, page_size, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def bytes_per_block(cfg: ModelConfig, page_size: int, dtype=jnp.float32) -> int:
    """K and V bytes of one block over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def forward(params: dict, kv: dict, tokens, positions, n_valid, block_tables, last_idx, cfg: ModelConfig,
            rt: T.Runtime):
    """One step over a batch of sequence slices.

    tokens, positions [B, T] int32 (absolute positions; row b's slice starts at positions[b, 0]);
    n_valid [B]: how many of row b's T tokens are real (0 for padded rows); block_tables [B, M];
    last_idx [B]: which token's logits to return. Writes the new keys/values into the pages and
    returns (logits [B, V] float32, new kv)."""
    dt = T.DTYPES[rt.compute_dtype]
    B, Tn = tokens.shape
    ps = kv["k"].shape[3]
    M = block_tables.shape[1]
    inv_freq = inv_frequencies(cfg)
    kv_len = positions[:, 0] + n_valid  # keys valid after this step
    valid = jnp.arange(Tn)[None, :] < n_valid[:, None]
    page_col = jnp.clip(positions // ps, 0, M - 1)
    pages = jnp.where(valid, jnp.take_along_axis(block_tables, page_col, axis=1), 0).reshape(-1)
    slots = jnp.where(valid, positions % ps, 0).reshape(-1)

    x = T.embed_tokens(params, tokens, cfg, dt)
    opts = T.attention_options(cfg)

    def attend(q, k, v, state):
        """The paged cache behind transformer.block: write this step's keys/values, then attend."""
        kp, vp, layer = state
        K, D = k.shape[2], k.shape[3]
        # Scatter: advanced indices (layer, pages, slots) around a slice -> update is [B*T, K, D].
        kp = kp.at[layer, :, pages, slots].set(k.reshape(B * Tn, K, D).astype(kp.dtype))
        vp = vp.at[layer, :, pages, slots].set(v.reshape(B * Tn, K, D).astype(vp.dtype))
        if Tn == 1:
            o = paged_attention(q[:, 0], kp[layer], vp[layer], block_tables, kv_len, policy=rt.policy,
                                soft_cap=opts["soft_cap"])[:, None]
        else:
            kg = _gather(kp[layer], block_tables).astype(dt)
            vg = _gather(vp[layer], block_tables).astype(dt)
            o = attention(q, kg, vg, policy=rt.policy, causal=True, q_offset=positions[:, 0], kv_lengths=kv_len,
                          **opts)
        return o, (kp, vp, layer)

    def body(carry, lp, layer):
        x, kp, vp = carry
        x, (kp, vp, _), _ = T.block(x, lp, positions, cfg, rt, inv_freq, attend, (kp, vp, layer))
        return (x, kp, vp), None

    (x, kp, vp), _ = T.layer_loop(body, (x, kv["k"], kv["v"]), params["layers"])
    x = jnp.take_along_axis(x, last_idx[:, None, None], axis=1)  # [B, 1, D]
    x = T.norm(x, params["final_norm"], cfg, rt)
    return T.output_logits(x, params, cfg, rt.policy)[:, 0], {"k": kp, "v": vp}


def _sample_rows(logits, key_data, temperature, top_k, top_p):
    """Per-row keys (each request has its own seed): key_data [B, 2] uint32 -> (tokens [B], next key_data).

    Each row does what Generator does for one sequence: key, sub = split(key); sample(..., sub). The
    batch goes to `sample` whole, not vmapped row by row: under vmap its lax.cond on "all rows greedy"
    would become a select that runs the sort over the vocabulary for every row on every step."""
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(key_data))  # [B, 2]
    tok = sample(logits, keys[:, 1], temperature, top_k, top_p)
    return tok, jax.random.key_data(keys[:, 0])


class StepArgs(NamedTuple):
    """The step's inputs, in call order (arrays, or ShapeDtypeStructs for lowering)."""

    params: Any
    kv: Any
    tokens: Any  # [B, T] int32
    positions: Any  # [B, T] int32, absolute
    n_valid: Any  # [B] int32: real tokens of each row (0 for padding rows)
    block_tables: Any  # [B, max_pages] int32
    last_idx: Any  # [B] int32: the token whose logits are sampled
    key_data: Any  # [B, 2] uint32: each request's own PRNG key
    temperature: Any  # [B] float32
    top_k: Any  # [B] int32
    top_p: Any  # [B] float32


def token_logprobs(logits, tokens, top: int):
    """logits [B, V] float32, tokens [B] -> (log p(token) [B], top ids [B, top] int32, their log p [B, top]).

    The unmodified distribution (before temperature and top-k/top-p), as OpenAI and vLLM report it."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, top)
    return chosen, top_ids.astype(jnp.int32), top_lp


def step(params, kv, tokens, positions, n_valid, block_tables, last_idx, key_data, temperature, top_k, top_p, *,
         cfg: ModelConfig, rt: T.Runtime):
    """The serving step: forward over the paged cache, then each row samples its next token.
    -> (next tokens [B] int32, next key_data [B, 2], kv, (log p(token) [B], top ids [B, K], top log p [B, K]))
    with K = infer.MAX_LOGPROBS, so requests asking for log-probabilities need no other program."""
    lg, kv = forward(params, kv, tokens, positions, n_valid, block_tables, last_idx, cfg, rt)
    tok, kd = _sample_rows(lg, key_data, temperature, top_k, top_p)
    return tok, kd, kv, token_logprobs(lg, tok, min(MAX_LOGPROBS, cfg.vocab_size))


def jit_step(cfg: ModelConfig, rt: T.Runtime, shardings: tuple[StepArgs, tuple] | None = None):
    """jit(step)(*StepArgs) with the cache donated: what the engine's runner calls and what
    `compile --mode serve` lowers. `shardings` = (input shardings as StepArgs, output shardings),
    from `step_shardings`, for a mesh; None runs wherever the arguments live (one device)."""
    fn = functools.partial(step, cfg=cfg, rt=rt)
    if shardings is None:
        return jax.jit(fn, donate_argnums=(1,))
    ins, outs = shardings
    return jax.jit(fn, in_shardings=tuple(ins), out_shardings=outs, donate_argnums=(1,))


def abstract_step_args(cfg: ModelConfig, dtype, batch: int, width: int, num_blocks: int, page_size: int,
                       max_pages: int) -> StepArgs:
    """ShapeDtypeStructs of one bucket's inputs ([batch, width] tokens over a pool of num_blocks)."""
    sds = jax.ShapeDtypeStruct
    i32, f32 = jnp.int32, jnp.float32
    return StepArgs(T.abstract_params(cfg, dtype), jax.eval_shape(lambda: init_pages(cfg, num_blocks, page_size, dtype)),
                    sds((batch, width), i32), sds((batch, width), i32), sds((batch,), i32),
                    sds((batch, max_pages), i32), sds((batch,), i32), sds((batch, 2), jnp.uint32),
                    sds((batch,), f32), sds((batch,), i32), sds((batch,), f32))


def step_shardings(cfg: ModelConfig, layout, args: StepArgs) -> tuple[StepArgs, tuple]:
    """(input shardings, output shardings) of the step on `layout`'s mesh: weights by their logical
    axes, cache pages by PAGE_AXES, per-row inputs split over the batch where it divides."""
    row, grid = ("batch",), ("batch", "seq")
    pages = layout.sharding(PAGE_AXES, args.kv["k"].shape)
    ins = StepArgs(layout.tree_shardings(T.param_axes(cfg), args.params), {"k": pages, "v": pages},
                   *(layout.sharding(ax, a.shape) for ax, a in zip(
                       (grid, grid, row, ("batch", None), row, ("batch", None), row, row, row), args[2:])))
    # Next tokens and their log p [B] split like n_valid [B]; top-K [B, K] like key_data [B, 2].
    outs = (ins.n_valid, ins.key_data, ins.kv, (ins.n_valid, ins.key_data, ins.key_data))
    return ins, outs


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


def seed_key_data(seed: int) -> Any:
    """uint32 [2] raw key for `seed` (what jax.random.key(seed) holds)."""
    return jax.random.key_data(jax.random.key(seed))
