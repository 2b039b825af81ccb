"""Remat policies (config.REMAT_POLICIES) -> JAX checkpoint policies, in one place.

The block tags its activations with `jax.ad_checkpoint.checkpoint_name` under the names of
config.REMAT_TENSORS (`tag`); a policy lists which of them the backward pass keeps in device memory
and which it keeps in host memory; everything untagged, and every tagged tensor the policy does not
name, is recomputed. This is MaxText's scheme (its `remat_policy` names: save_qkv_proj,
save_dot_except_mlp, offloaded decoder-layer input), so the planner, `compile` and `train` share
the names.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from polychip.config import REMAT_POLICIES, REMAT_TENSORS, ConfigError

#: Where offloaded activations live between the forward and the backward pass (JAX's memory kind).
OFFLOAD_DST = "pinned_host"


def tag(x, name: str):
    """Name an activation for the remat policy (identity outside jax.checkpoint)."""
    assert name in REMAT_TENSORS, name
    return checkpoint_name(x, name)


def checkpoint_policy(name: str):
    """The jax.checkpoint policy for remat policy `name`; None means no checkpoint at all (keep everything)."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"train.remat must be one of {', '.join(REMAT_POLICIES)}, got {name!r}")
    p = REMAT_POLICIES[name]
    if "*" in p.saved:
        return None
    if name == "dots":
        # Every matmul without batch dimensions, tagged or not (what "dots" has always meant here): the
        # dense projections' outputs, which dense() computes as 2-D GEMMs; attention's batched
        # products are recomputed.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if p.offloaded:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(p.saved), names_which_can_be_offloaded=list(p.offloaded),
            offload_src="device", offload_dst=OFFLOAD_DST)
    return jax.checkpoint_policies.save_only_these_names(*p.saved)


def remat(fn: Callable, name: str) -> Callable:
    """fn wrapped in jax.checkpoint under remat policy `name` (fn itself when the policy keeps everything)."""
    policy = checkpoint_policy(name)
    return fn if policy is None else jax.checkpoint(fn, policy=policy, prevent_cse=False)
