"""Mixture-of-experts feed-forward: top-k routing, shared experts, dropless dispatch, auxiliary losses.

Called by transformer.block in place of the dense SwiGLU when cfg.n_experts > 0. Per layer:
  "moe_router":  [L, D, E]         (layers, embed, None)        router logits = h @ w
  "moe_gate", "moe_up": [L, E, D, F] (layers, exp, embed, mlp)  one SwiGLU per expert, F = expert_d_ff
  "moe_down":    [L, E, F, D]      (layers, exp, mlp, embed)
  "shared_gate", "shared_up": [L, D, S], "shared_down": [L, S, D]   S = n_shared_experts * F
  "shared_router": [L, D, 1]       Qwen2-MoE's sigmoid gate on the shared experts' output
The `exp` logical axis maps to the `expert` mesh axis (parallel/sharding.py).

Routing (one token, logits z = h @ w_router, float32):
  softmax gate: p = softmax(z); sigmoid gate: p = sigmoid(z); the k largest p pick the experts and
  are the gates, renormalised to sum 1 when cfg.router_norm_topk.
Dispatch is dropless (MegaBlocks, Gale et al. 2022): the N*k (token, expert) pairs are sorted by
expert, multiplied by their expert's weights with one grouped matmul per projection (the registry's
`grouped_matmul`), and unsorted; no capacity factor, no dropped tokens, no padding to a capacity.
With an expert mesh axis > 1 the pairs travel to the devices owning their experts by ragged all-to-all
(`_expert_parallel`).

Auxiliary losses, per layer, over all tokens of the batch:
  load balance (Switch Transformer eq. 4): E * sum_e f_e * P_e, f_e = share of the N*k assignments
    that went to e, P_e = mean over tokens of p_e (p renormalised to sum 1 for sigmoid gates): 1 when
    uniform;
  z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(z)^2.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from polychip.config import ModelConfig
from polychip.kernels.grouped_matmul import grouped_matmul
from polychip.kernels.ragged_all_to_all import ragged_all_to_all

EXPERT_KEYS = ("moe_gate", "moe_up", "moe_down")


def layer_shapes(cfg: ModelConfig) -> dict:
    L, D, E, F = cfg.n_layers, cfg.d_model, cfg.n_experts, cfg.expert_d_ff
    shapes = {"moe_router": (L, D, E), "moe_gate": (L, E, D, F), "moe_up": (L, E, D, F), "moe_down": (L, E, F, D)}
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * F
        shapes.update(shared_gate=(L, D, S), shared_up=(L, D, S), shared_down=(L, S, D))
    if cfg.shared_expert_gate:
        shapes["shared_router"] = (L, D, 1)
    return shapes


def layer_axes(cfg: ModelConfig) -> dict:
    axes = {"moe_router": ("layers", "embed", None), "moe_gate": ("layers", "exp", "embed", "mlp"),
            "moe_up": ("layers", "exp", "embed", "mlp"), "moe_down": ("layers", "exp", "mlp", "embed")}
    if cfg.n_shared_experts:
        axes.update(shared_gate=("layers", "embed", "mlp"), shared_up=("layers", "embed", "mlp"),
                    shared_down=("layers", "mlp", "embed"))
    if cfg.shared_expert_gate:
        axes["shared_router"] = ("layers", "embed", None)
    return axes


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
def route(h2, w_router, cfg: ModelConfig):
    """h2 [N, D] -> (experts [N, k] int32, gates [N, k] float32, aux {"moe_lb_loss", "moe_z_loss"})."""
    z = jnp.dot(h2, w_router.astype(h2.dtype), preferred_element_type=jnp.float32)
    p = jax.nn.softmax(z, axis=-1) if cfg.router_gate == "softmax" else jax.nn.sigmoid(z)
    gates, experts = jax.lax.top_k(p, cfg.experts_per_token)
    if cfg.router_norm_topk:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), gates, aux_losses(z, p, experts, cfg)


def aux_losses(z, p, experts, cfg: ModelConfig) -> dict:
    """Load-balancing and z-loss of one layer (module docstring); z, p [N, E], experts [N, k]."""
    E = cfg.n_experts
    share = jnp.mean(jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=1), axis=0) / cfg.experts_per_token
    probs = p if cfg.router_gate == "softmax" else p / jnp.sum(p, axis=-1, keepdims=True)
    lb = E * jnp.sum(jax.lax.stop_gradient(share) * jnp.mean(probs, axis=0))
    zl = jnp.mean(jnp.square(jax.nn.logsumexp(z, axis=-1)))
    return {"moe_lb_loss": lb, "moe_z_loss": zl}


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------
def _swiglu_experts(xs, sizes, wg, wu, wd, act, policy, rows=None):
    """xs [M, D] sorted by expert, sizes [E] -> [M, D]: each row through its expert's SwiGLU. rows: the
    rows expected in groups (the kernels' cost hint; grouped_matmul)."""
    g = grouped_matmul(xs, wg, sizes, policy=policy, rows=rows)
    u = grouped_matmul(xs, wu, sizes, policy=policy, rows=rows)
    return grouped_matmul(act(g) * u, wd, sizes, policy=policy, rows=rows)


def _group_sizes(ids, n_groups: int):
    """Rows per group; ids outside [0, n_groups) (padding) count in none."""
    return jnp.sum(ids[:, None] == jnp.arange(n_groups, dtype=ids.dtype)[None, :], axis=0, dtype=jnp.int32)


def dispatch_local(x2, experts, gates, weights, act, policy, rows=None):
    """All experts on this device. x2 [N, D], experts/gates [N, k] -> [N, D] = sum_j gate_j * expert_j(x).
    rows: (token, expert) pairs expected among the N x k (default all; see _expert_parallel)."""
    N, k = experts.shape
    E = weights[0].shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    ys = _swiglu_experts(jnp.take(x2, order // k, axis=0), _group_sizes(flat, E), *weights, act, policy, rows)
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    return jnp.einsum("nkd,nk->nd", y.reshape(N, k, -1), gates.astype(y.dtype))


def _expert_parallel(x2, experts, gates, weights, act, policy, *, ep: int, tensor: str | None, split: bool):
    """Inside shard_map: this device's tokens x2 [n, D] and its E/ep experts' weights. With `split`
    the tokens are the same on every expert shard (the default rules split the batch over data x fsdp
    only) and each expert shard takes 1/ep of them, all-gathering the results at the end; without it
    (a rule table that also splits the batch over `expert`) each shard already holds its own tokens.
    Every (token, expert) pair goes to the shard owning that expert with one ragged all-to-all (the
    registry's `ragged_all_to_all`: XLA's ragged collective on TPU / GPU, a padded all_to_all on CPU),
    the shard runs its experts over what it received, and a second one brings the results back.

    The receive buffer holds, for each source shard s, a block of n_c x min(k, E_local) rows, the most one
    source can send one shard (a token's k experts are distinct, so at most E_local of them sit on one
    shard: MaxText's worst case too), of which the first recv_sizes[s] are s's pairs, sorted by expert; the
    rest carry expert id E_local, which belongs to no group and yields 0."""
    n, k = experts.shape
    n_c = n // ep if split else n
    E_loc, m = weights[0].shape[0], n_c * k
    blk = n_c * min(k, E_loc)  # rows one source can send one shard
    me = jax.lax.axis_index("expert")
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * n_c, n_c, axis=0) if split else a  # noqa: E731
    x_c, e_c, g_c = mine(x2), mine(experts), mine(gates)
    flat = e_c.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    e_sorted = flat[order]
    counts = _group_sizes(e_sorted, ep * E_loc).reshape(ep, E_loc)  # pairs per destination and its local expert
    sizes = jnp.sum(counts, axis=1)
    starts = jnp.cumsum(sizes) - sizes
    # The receiver learns how many rows of each of its experts every source sends (a small all-to-all) and
    # labels its buffer from that: rows arrive sorted by expert, so no ids travel with them.
    recv_counts = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # [source, local expert]
    recv_sizes = jnp.sum(recv_counts, axis=1)
    ends = jnp.cumsum(recv_counts, axis=1)
    recv_e = jnp.sum(jnp.arange(blk, dtype=jnp.int32)[None, :, None] >= ends[:, None, :], axis=-1).reshape(ep * blk)
    blocks = jnp.full((ep,), me * blk, jnp.int32)  # in every destination, this shard's rows go to block `me`

    def exchange(operand, output, in_off, send, out_off, recv):
        return ragged_all_to_all(operand, output, in_off, send, out_off, recv, axis_name="expert", max_rows=blk,
                                 policy=policy)

    D = x2.shape[1]
    recv_x = exchange(jnp.take(x_c, order // k, axis=0), jnp.zeros((ep * blk, D), x2.dtype), starts, sizes, blocks,
                      recv_sizes)
    # Balanced routing sends each shard m pairs in all: the kernels' declared cost is for those, not the ep x blk
    # rows of the buffer (the Pallas kernels skip rows in no group; XLA's paths do not).
    y = dispatch_local(recv_x, recv_e[:, None], jnp.ones((ep * blk, 1), jnp.float32), weights, act, policy, rows=m)
    if tensor:
        y = jax.lax.psum(y, tensor)
    # Back: block s's first recv_sizes[s] rows return to shard s, to where they started there.
    back_at = jax.lax.all_to_all(starts, "expert", 0, 0, tiled=True)
    back = exchange(y, jnp.zeros((m, D), y.dtype), jnp.arange(ep, dtype=jnp.int32) * blk, recv_sizes, back_at, sizes)
    ys = jnp.zeros((m, D), y.dtype).at[order].set(back, unique_indices=True)
    out = jnp.einsum("nkd,nk->nd", ys.reshape(n_c, k, -1), g_c.astype(ys.dtype))
    return jax.lax.all_gather(out, "expert", axis=0, tiled=True) if split else out


def _sharded(x, experts, gates, weights, act, rt):
    """Routed experts over the runtime's mesh: tokens stay split as the batch is, experts split over
    `expert`, expert hidden width over `tensor` (partial sums added with psum)."""
    layout, (B, T, D) = rt.layout, x.shape
    tok = layout.spec(("batch", "seq", "act_embed"), x.shape)
    wspec = [layout.spec(("exp", None, "mlp"), w.shape) for w in weights[:2]]
    wspec.append(layout.spec(("exp", "mlp", None), weights[2].shape))
    ep = layout.mesh.shape["expert"] if wspec[0][0] == "expert" else 1
    tensor = "tensor" if wspec[0][2] == "tensor" else None
    split = "expert" not in _batch_axes(tok)
    policy = rt.policy.with_layout(None)  # per-shard already: the kernel must not shard_map again

    def body(xl, el, gl, *wl):
        b, t = xl.shape[:2]
        args = (xl.reshape(b * t, D), el.reshape(b * t, -1), gl.reshape(b * t, -1), wl, act, policy)
        if ep > 1:
            y = _expert_parallel(*args, ep=ep, tensor=tensor, split=split)
        else:
            y = dispatch_local(*args)
            y = jax.lax.psum(y, tensor) if tensor else y
        return y.reshape(b, t, D)

    route_spec = P(*tok[:2], None)
    return jax.shard_map(body, mesh=layout.mesh, in_specs=(tok, route_spec, route_spec, *wspec), out_specs=tok,
                         check_vma=False)(x, experts, gates, *weights)


def feed_forward(h, lp: dict, cfg: ModelConfig, rt, act):
    """h [B, T, D] (normed) -> (y [B, T, D], aux losses of this layer). `act`: the SwiGLU gate activation."""
    B, T, D = h.shape
    experts, gates, aux = route(h.reshape(B * T, D), lp["moe_router"], cfg)
    weights = tuple(lp[k].astype(h.dtype) for k in EXPERT_KEYS)
    experts, gates = experts.reshape(B, T, -1), gates.reshape(B, T, -1)
    mesh_size = 1 if rt.layout is None else rt.layout.mesh.size
    if mesh_size == 1 or B * T % _token_split(rt, h.shape):
        # Unsharded, or too few tokens to split: XLA partitions the sort and gathers as it can, and a
        # kernel it cannot partition runs replicated per shard through the registry (correct, not fast).
        y = dispatch_local(h.reshape(B * T, D), experts.reshape(B * T, -1), gates.reshape(B * T, -1), weights, act,
                           rt.policy).reshape(B, T, D)
    else:
        y = _sharded(h, experts, gates, weights, act, rt)
    if cfg.n_shared_experts:
        s = act(_dot(h, lp["shared_gate"])) * _dot(h, lp["shared_up"])
        s = _dot(rt.constrain(s, ("batch", "seq", "act_mlp")), lp["shared_down"])
        if cfg.shared_expert_gate:
            s = s * jax.nn.sigmoid(_dot(h, lp["shared_router"]))
        y = y + s
    return y, aux


def _batch_axes(spec) -> tuple:
    return spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()


def _token_split(rt, shape) -> int:
    """Ways the token rows are split inside _sharded (batch shards, then expert shards); 1 when unsharded."""
    axes = _batch_axes(rt.layout.spec(("batch", "seq", "act_embed"), shape))
    return math.prod(rt.layout.mesh.shape[a] for a in {*axes, "expert"})


def _dot(x, w):
    return jnp.einsum("btd,df->btf", x, w.astype(x.dtype))
