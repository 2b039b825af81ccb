"""AdamW (Loshchilov & Hutter 2019) with linear warm-up + cosine decay and global-norm clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from polychip.parallel.sharding import is_axes

from polychip.config import TrainConfig


def schedule(t: TrainConfig) -> optax.Schedule:
    warmup = max(0, min(t.warmup_steps, t.steps))
    decay = max(warmup + 1, t.steps)  # optax needs a non-empty cosine phase
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else t.lr, peak_value=t.lr, warmup_steps=warmup, decay_steps=decay,
        end_value=t.lr * t.min_lr_ratio)


#: Parameters never decayed: norm scales and the q/k/v biases (Qwen2), as in every Llama/Qwen recipe.
NO_DECAY = ("norm", "'bq'", "'bk'", "'bv'")


def decay_mask(params):
    """Weight decay on matrices only: norms and biases are excluded."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not any(k in jax.tree_util.keystr(p) for k in NO_DECAY), params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    mu_dtype = jnp.bfloat16 if t.param_dtype == "bfloat16" else jnp.float32
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                             mask=decay_mask, mu_dtype=mu_dtype))
    return optax.chain(*parts)


def opt_state_axes(opt_state, params_axes):
    """Logical axes for every optimiser-state leaf: a leaf whose path ends with a parameter's path
    (Adam's mu/nu mirror the params tree) takes that parameter's axes; anything else (step counts) is
    replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, ax: by_path.__setitem__(jax.tree_util.keystr(p), ax), params_axes,
                                     is_leaf=is_axes)

    def axes_for(path, leaf):
        s = jax.tree_util.keystr(path)
        for ps, ax in by_path.items():
            if s.endswith(ps) and len(ax) == len(getattr(leaf, "shape", ())):
                return ax
        return (None,) * len(getattr(leaf, "shape", ()))

    return jax.tree_util.tree_map_with_path(axes_for, opt_state)
