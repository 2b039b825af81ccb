"""Pipeline parallelism over the layer stack: the same block, its layers split into stages.

The stacked layer params [L, ...] are viewed as [S, R, L/(S*R), ...] (S = mesh.stage stages, R =
circular repeats) with the stage dim on the `stage` mesh axis (logical axis `stage`): stage s, repeat
r holds layers (r*S + s) * Lps ... + Lps - 1, Lps = L/(S*R). With R = 1 that is the contiguous split
the `layers` -> `stage` rule already stores, so viewing it moves nothing; with R > 1 the layers of
a stage are not contiguous in [L] and XLA moves them (an all-to-all of the layer weights, and of
their gradients, per step).

Schedule (GPipe with MaxText's circular extension, all stages stepping in lock-step under SPMD):
the batch is cut into M micro-batches; at iteration t stage s works on micro-batch (t - s) mod M,
repeat (t - s) div M, its output moving to stage s+1 (a collective permute of one micro-batch of
activations) and stage S-1's back to stage 0 for the next repeat. A micro-batch leaves stage S-1
at t + S - 1 and re-enters stage 0 at t + M, so M >= S keeps every repeat's input ready in time.
Each stage does R*M units of Lps layers in N = R*M + S - 1 iterations:

    bubble fraction = (S - 1) / (R*M + S - 1)

(GPipe, R = 1: (S-1)/(M+S-1); circular repeats divide the idle time by R at equal M). The stages
are one `jax.vmap(..., spmd_axis_name="stage")` of the unchanged block, so the model is not written
twice, and autodiff gives the backward schedule (forward iterations reversed).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from polychip.config import ConfigError

STAGE_AXIS = "stage"


def stages(rt) -> int:
    """Pipeline stages of this runtime: the `stage` mesh axis size (1 without a layout)."""
    return 1 if rt.layout is None else int(rt.layout.mesh.shape.get(STAGE_AXIS, 1))


def bubble_fraction(n_stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of each stage's time under this schedule: (S - 1) / (R*M + S - 1)."""
    return (n_stages - 1) / (repeats * microbatches + n_stages - 1)


def plan(n_layers: int, batch: int, n_stages: int, microbatches: int, repeats: int) -> tuple[int, int]:
    """(micro-batches, layers per stage and repeat); ConfigError (one line) when they cannot be made."""
    M = microbatches or n_stages
    if n_layers % (n_stages * repeats):
        raise ConfigError(f"{n_layers} layers are not divisible by {n_stages} pipeline stages x {repeats} repeats")
    if M < n_stages:
        raise ConfigError(f"{M} pipeline micro-batches are fewer than the {n_stages} stages")
    if batch % M:
        raise ConfigError(f"batch {batch} is not divisible by {M} pipeline micro-batches")
    return M, n_layers // (n_stages * repeats)


def stage_view(layers: dict, layer_axes: dict, n_stages: int, repeats: int, rt) -> dict:
    """[L, ...] stacked params -> [S, R, Lps, ...], the stage dim on the `stage` logical axis."""
    def view(a, axes):
        lps = a.shape[0] // (n_stages * repeats)
        w = a.reshape(repeats, n_stages, lps, *a.shape[1:]).swapaxes(0, 1)
        return rt.constrain(w, ("stage", None, *axes))

    return jax.tree.map(view, layers, layer_axes, is_leaf=lambda x: type(x) is tuple)


def _to_micro(a, M: int):
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, ...: the per-device rows of a batch
    split over the data axes stay on their device (row b = i*M + m, i keeps the batch sharding)."""
    return a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1)


def _from_micro(a):
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def pipeline(body: Callable, layers: dict, layer_axes: dict, x, positions, rt, *, unroll: bool = False):
    """Run the layer stack as an S-stage pipeline. body(carry, lp, positions=p) -> (carry, aux)
    is the layer loop's body (remat already applied); x [B, T, D], positions [B, T] -> x [B, T, D]."""
    S, R = stages(rt), rt.pipeline_repeats
    L = jax.tree.leaves(layers)[0].shape[0]
    M, _ = plan(L, x.shape[0], S, rt.pipeline_microbatches, R)
    w = stage_view(layers, layer_axes, S, R, rt)
    micro = (None, "batch", "seq", "act_embed")
    # Said explicitly: XLA's propagation through the reshape may replicate the micro-batches.
    xs = rt.constrain(_to_micro(x, M), micro)
    ps = rt.constrain(_to_micro(positions, M), micro[:3])
    act = ("stage", "batch", "seq", "act_embed")

    def run_stage(w_s, h, p):
        return jax.lax.scan(lambda c, lp: body(c, lp, positions=p), h, w_s, unroll=unroll)[0]

    run_stages = jax.vmap(run_stage, spmd_axis_name=STAGE_AXIS)
    stage_ids = jnp.arange(S)
    is_first = (stage_ids == 0).reshape(S, 1, 1, 1)
    is_last = (stage_ids == S - 1).reshape(S, 1, 1, 1)

    def iteration(carry, t):
        state, buf = carry
        buf = rt.constrain(buf, micro)
        # Stage 0 takes micro-batch t mod M (from the input, or stage S-1's output of the last repeat).
        # A select against the stage index, not a concatenate along the stage-split dim: the SPMD
        # partitioner then keeps every array split (a concatenate made it gather the whole batch).
        first = jax.lax.dynamic_index_in_dim(buf, t % M, keepdims=True)
        h = rt.constrain(jnp.where(is_first, first, jnp.roll(state, 1, axis=0)), act)
        mb = (t - stage_ids) % M
        rep = jnp.clip((t - stage_ids) // M, 0, R - 1)
        w_t = jax.tree.map(lambda a: a[:, 0] if R == 1 else jax.vmap(lambda ws, r: ws[r])(a, rep), w)
        state = rt.constrain(run_stages(w_t, h, ps[mb]), act)
        # Stage S-1 finished micro-batch t - S + 1 (none before t = S - 1): write it back to buf.
        done = t - (S - 1)
        slot = done % M
        last = jnp.sum(jnp.where(is_last, state, 0), axis=0)  # a reduction over `stage`, not a gather
        old = jax.lax.dynamic_index_in_dim(buf, slot, keepdims=False)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(done >= 0, last, old), slot, axis=0)
        return (state, rt.constrain(buf, micro)), None

    state0 = jnp.zeros((S, *xs.shape[1:]), xs.dtype)
    (_, out), _ = jax.lax.scan(iteration, (rt.constrain(state0, act), xs), jnp.arange(R * M + S - 1))
    return rt.constrain(_from_micro(out), micro[1:])
