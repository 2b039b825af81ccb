"""Logical axis names -> mesh axes, as data.

Every weight and the main activations carry logical axis names (batch, seq, embed, heads, kv_heads,
head_dim, mlp, vocab, layers, norm). `DEFAULT_RULES` maps each to mesh axes of the (data, fsdp,
tensor) mesh, in the spirit of MaxText's logical_axis_rules: parameters are sharded over `fsdp` on
their embed dimension (ZeRO-3 style; XLA inserts the all-gathers) and over `tensor` on heads / MLP
hidden / vocab (Megatron-style), the batch over `data` x `fsdp`. The layer stack is split over
`stage` (pipeline, model/pipeline.py) and the activations' sequence over `context` (context-parallel
attention, kernels/attention/context.py); both axes have size 1 unless the mesh asks for them.

A mesh axis that does not divide a dimension is dropped for that array (replicated instead) rather
than failing: e.g. 2 KV heads on a tensor axis of 4. `Layout.dropped` records it for reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Outermost to innermost: data (and stage) cross slices / hosts; tensor sits on neighbouring devices.
#: stage: pipeline stages over the layer stack; context: the sequence of attention split (long context);
#: expert: mixture-of-experts experts split. Axes of size 1 cost nothing.
MESH_AXES = ("data", "stage", "fsdp", "context", "expert", "tensor")

DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": "context",  # activations' sequence: split for context-parallel attention (long context)
    # Weights are also split over `context` (ZeRO-3 across the sequence chunks, as MaxText's rules do):
    # context devices hold different tokens, not different weights, so they would otherwise repeat them.
    "embed": ("fsdp", "context"),
    # The embedding table during the token lookup: as stored (None: gathered; what multi-slice meshes use).
    "embed_lookup": ("fsdp", "context"),
    "act_embed": None,  # activations' model dimension: replicated (sequence parallelism is future work)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "vocab": "tensor",
    "act_vocab": "tensor",
    # The layer stack is stored split over pipeline stages (contiguous groups); `stage` names the
    # stage dim of the pipeline's [stage, repeat, layer, ...] view of it (model/pipeline.py).
    "layers": "stage",
    "stage": "stage",
    "norm": None,
    "cache_batch": ("data", "fsdp"),
    "cache_seq": None,
    # Mixture-of-experts (model/moe.py): the expert dimension of expert weights over `expert`; each
    # expert's embed and hidden dims then follow "embed" and "mlp" as a dense MLP's do.
    "exp": "expert",
}


class ShardingError(ValueError):
    """A mesh or rule table that cannot work (user mistake)."""


def is_axes(x) -> bool:
    """True for a logical-axes leaf: a plain tuple of names/None (not a NamedTuple of arrays)."""
    return type(x) is tuple and all(isinstance(e, (str, type(None))) for e in x)


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class Layout:
    """A mesh plus the logical->mesh rule table. Hashable: usable as a static jit argument."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    @staticmethod
    def create(mesh: Mesh, overrides: dict | None = None) -> "Layout":
        rules = dict(DEFAULT_RULES)
        for k, v in (overrides or {}).items():
            if k not in rules:
                raise ShardingError(f"unknown logical axis {k!r} in mesh.rules; known: {', '.join(rules)}")
            for ax in _as_tuple(v):
                if ax not in mesh.axis_names:
                    raise ShardingError(f"mesh.rules[{k!r}] names mesh axis {ax!r}; mesh axes are {mesh.axis_names}")
            rules[k] = v
        return Layout(mesh, tuple(sorted((k, _as_tuple(v)) for k, v in rules.items())))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        table = dict(self.rules)
        if logical not in table:
            raise ShardingError(f"logical axis {logical!r} has no rule")
        return table[logical]

    def spec(self, logical_axes: tuple, shape: tuple | None = None) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes; axes not dividing `shape` are dropped."""
        used: set[str] = set()
        parts = []
        for i, name in enumerate(logical_axes):
            axes = [a for a in self.mesh_axes(name) if a not in used and self.mesh.shape[a] > 1]
            if shape is not None:
                keep, size = [], 1
                for a in axes:
                    if shape[i] % (size * self.mesh.shape[a]) == 0:
                        keep.append(a)
                        size *= self.mesh.shape[a]
                axes = keep
            used.update(axes)
            parts.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
        return PartitionSpec(*parts)

    def sharding(self, logical_axes: tuple, shape: tuple | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def constrain(self, x, logical_axes: tuple):
        """with_sharding_constraint by logical names (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def tree_shardings(self, axes_tree, shapes_tree):
        """Shardings for a pytree of arrays (or ShapeDtypeStructs) given a matching tree of logical axes."""
        return jax.tree.map(lambda ax, s: self.sharding(ax, s.shape), axes_tree, shapes_tree,
                            is_leaf=is_axes)

    def dropped(self, axes_tree, shapes_tree) -> list[str]:
        """Descriptions of rules that could not apply because a mesh axis does not divide a dimension."""
        out = []

        def check(path, ax, s):
            full = self.spec(ax)
            got = self.spec(ax, s.shape)
            if tuple(_as_tuple(p) for p in full) != tuple(_as_tuple(p) for p in got):
                out.append(f"{jax.tree_util.keystr(path)} {tuple(s.shape)}: wanted {full}, using {got}")

        jax.tree_util.tree_map_with_path(check, axes_tree, shapes_tree, is_leaf=is_axes)
        return out

    @property
    def batch_divisor(self) -> int:
        """How many ways the batch dimension is split."""
        return int(np.prod([self.mesh.shape[a] for a in self.mesh_axes("batch")]))
