"""One registry of kernel implementations per op, and the one path every op is called through.

The model asks for an op ("attention", "rms_norm", "cross_entropy", ...) through a `KernelPolicy`
that was fixed once, at the boundary, for the target it is being traced for (which may not be the
host: `compile` traces for a TPU pod on a CPU machine). The registry walks the op's implementations
in priority order and picks the first whose `supported_on(target, query)` returns no reason. A
per-op override names one implementation; if it cannot run, the error lists why, instead of
silently falling back.

Each op's api.py declares the op with `declare` (its reference, the backend modules to load, each
array argument's logical axes); each backend module lists its implementations in `KERNELS`. The
registry imports those modules itself: one whose toolchain is missing (no Triton, no Mosaic, no NKI)
fails to import and contributes nothing, so `import polychip` never breaks. The api's public function
then calls `KernelPolicy.call`, which picks the implementation, passes the target's device_kind to
kernels tuned per chip, and runs custom calls XLA cannot partition per shard on a multi-device mesh.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp


class KernelError(ValueError):
    """No implementation can run the op as asked (the message carries each candidate's reason)."""


@dataclass(frozen=True)
class Target:
    """What the op will run on: `platform` is JAX's (cpu, gpu, tpu, neuron); `device_kind` as JAX reports it."""

    platform: str
    device_kind: str = ""

    @staticmethod
    def of(device: Any | None = None) -> "Target":
        d = device if device is not None else jax.devices()[0]
        platform = d.platform
        if platform in ("cuda", "rocm"):
            platform = "gpu"
        return Target(platform=platform, device_kind=getattr(d, "device_kind", ""))


# supported_on(target, query) -> None when usable, else a short reason string.
SupportFn = Callable[[Target, dict], "str | None"]


def always(target: Target, query: dict) -> None:
    return None


@dataclass(frozen=True)
class Impl:
    op: str
    name: str
    fn: Callable
    supported_on: SupportFn
    priority: int
    #: Human-readable verification status (e.g. "executed in CI (CPU)", "unverified: needs Neuron").
    verified: str = ""
    #: Whether "auto" may pick it. False for interpreters (test-only) and for kernels not yet run on
    #: their hardware: those are used only when named in an override.
    auto: bool = True
    #: Pass the target's device_kind as `device_kind=` (kernels with per-chip tuned block sizes): a
    #: deviceless compile on a CPU host then uses the target chip's tuning, not the host's.
    wants_device_kind: bool = False
    #: A custom call XLA cannot partition (Mosaic, Triton): on a multi-device mesh `KernelPolicy.call`
    #: runs it per shard under shard_map (see `KernelPolicy.per_shard`).
    manual_partition: bool = False


_REGISTRY: dict[str, list[Impl]] = {}
REFERENCE_PRIORITY = 100


def kernel(name: str, fn: Callable, *, priority: int, supported_on: SupportFn = always, verified: str = "",
           auto: bool = True, wants_device_kind: bool = False, manual_partition: bool = False) -> Impl:
    """One implementation as a backend module lists it in its `KERNELS`; the op that loads the module
    fills in `op`. Lower priority number = tried first; auto=False: used only when named in an override."""
    return Impl("", name, fn, supported_on, priority, verified, auto, wants_device_kind, manual_partition)


def _add(impl: Impl) -> None:
    impls = [i for i in _REGISTRY.get(impl.op, []) if i.name != impl.name]
    impls.append(impl)
    impls.sort(key=lambda i: i.priority)
    _REGISTRY[impl.op] = impls


def register(op: str, name: str, **opts):
    """Decorator: add `fn` as implementation `name` of `op` (options as for `kernel`); for tests and
    one-off backends outside an op folder."""

    def deco(fn: Callable) -> Callable:
        _add(dataclasses.replace(kernel(name, fn, **opts), op=op))
        return fn

    return deco


@dataclass(frozen=True)
class SeqSplit:
    """How an op runs when the mesh axes its first argument's `seq` axis is split over (the
    `context` axis) split it: per shard, under shard_map, with `wrap(call, arrays, axes)` given this
    shard's arrays by name (a dict), the mesh axes of the split, and `call(arrays) -> out` the
    implementation; `wrap` exchanges what the op needs across those axes (attention: all-gather K/V,
    offset the queries) and returns this shard's output, laid out like the first argument.
    `query(query, ways)` is the query the implementation is picked by, for one of `ways` chunks."""

    wrap: Callable
    query: Callable[[dict, int], dict]


@dataclass(frozen=True)
class Op:
    """An op as its api.py declares it. `args`: each array argument's name and logical axes, in call
    order (`...` stands for as many unnamed dimensions as the array has left; names before it are
    dropped from the right when the array has fewer dimensions). `partial_sums`: the
    outputs are sums over the first argument's leading dimension (a loss sum), added up across its
    shards when the op runs per shard. `seq_split`: see `SeqSplit`."""

    name: str
    args: tuple[tuple[str, tuple], ...]
    partial_sums: bool = False
    #: How the op runs with its arguments' `seq` axis split over mesh axes (context parallelism);
    #: None: the op declares no `seq` axis or XLA partitions it.
    seq_split: "SeqSplit | None" = None

    def axes(self, arg: str, ndim: int) -> tuple:
        """Logical axes of argument `arg` with `ndim` dimensions (a scalar is replicated: ())."""
        ax = dict(self.args)[arg]
        if ndim == 0:
            return ()
        if ... in ax:
            i = ax.index(...)
            after = ax[i + 1:]
            # Fewer dimensions than names: the leading names are kept as far as they go (a row-wise op
            # declared ("batch", "seq", ..., None) called on [N, D] is ("batch", None)).
            before = ax[:max(0, min(i, ndim - len(after)))]
            ax = before + (None,) * (ndim - len(before) - len(after)) + after
        if len(ax) != ndim:
            raise ValueError(f"{self.name}: argument {arg} has {ndim} dimensions; its declared axes are {ax}")
        return ax


def declare(name: str, *, reference: Callable, backends: tuple[str, ...], args: dict[str, tuple],
            partial_sums: bool = False, seq_split: SeqSplit | None = None) -> Op:
    """Register op `name`: `reference` (the plain-jnp ground truth, tried last by "auto") and the
    `KERNELS` of each module polychip.kernels.<name>.<backend> that imports. A module whose toolchain
    is missing is skipped (one entry fewer, never a broken `import polychip`); an ImportError of our
    own code is not a missing toolchain and is raised. Returns the Op its api calls through."""
    _add(Impl(name, "reference", reference, always, REFERENCE_PRIORITY, "executed in CI (CPU); the ground truth"))
    for backend in backends:
        try:
            module = importlib.import_module(f"polychip.kernels.{name}.{backend}")
        except ImportError as e:
            if (e.name or "").startswith("polychip"):
                raise
            continue
        for k in module.KERNELS:
            _add(dataclasses.replace(k, op=name))
    return Op(name, tuple(args.items()), partial_sums, seq_split)


def implementations(op: str) -> list[Impl]:
    _ensure_loaded()
    if op not in _REGISTRY:
        raise KernelError(f"unknown kernel op {op!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    return list(_REGISTRY[op])


def ops() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def resolve(op: str, target: Target, query: dict, override: str | None = None) -> Impl:
    """Pick the implementation of `op` for `target` and this call's `query` (shapes, dtypes, options)."""
    impls = implementations(op)
    if override and override != "auto":
        named = [i for i in impls if i.name == override]
        if not named:
            raise KernelError(
                f"kernel {op}={override!r} is not registered; available: {', '.join(i.name for i in impls)}"
            )
        reason = named[0].supported_on(target, query)
        if reason:
            raise KernelError(f"kernel {op}={override!r} cannot run on {target.platform}: {reason}")
        return named[0]
    reasons = []
    for impl in impls:
        if not impl.auto:
            continue
        reason = impl.supported_on(target, query)
        if reason is None:
            return impl
        reasons.append(f"{impl.name}: {reason}")
    raise KernelError(f"no implementation of {op} supports this call on {target.platform}: " + "; ".join(reasons))


def shard_specs(layout: Any, axes: tuple, shapes: tuple) -> list:
    """Each argument's PartitionSpec under `layout` (mesh axes that do not divide a dimension are
    dropped, as everywhere). A logical axis several arguments carry is split alike in all of them or in
    none: a per-shard kernel must see matching slices (query heads split but KV heads whole would break
    GQA's head grouping)."""
    axes = [tuple(a) for a in axes]
    while True:
        specs = [layout.spec(a, s) for a, s in zip(axes, shapes)]
        first: dict[str, Any] = {}
        mismatched = {n for ax, spec in zip(axes, specs) for n, part in zip(ax, spec)
                      if n is not None and first.setdefault(n, part) != part}
        if not mismatched:
            return specs
        axes = [tuple(None if n in mismatched else n for n in a) for a in axes]


@dataclass(frozen=True)
class KernelPolicy:
    """Fixed at the boundary (CLI, engine, compile); hashable so it can be a static jit argument."""

    target: Target
    overrides: tuple[tuple[str, str], ...] = ()
    #: The sharding layout (polychip.parallel.sharding.Layout) the model runs under, if any: kernels
    #: that XLA cannot partition are run per shard over its mesh.
    layout: Any = None

    @staticmethod
    def create(target: Target | None = None, overrides: dict[str, str] | None = None) -> "KernelPolicy":
        ov = tuple(sorted((overrides or {}).items()))
        return KernelPolicy(target or Target.of(), ov)

    def override(self, op: str) -> str | None:
        return dict(self.overrides).get(op)

    @property
    def flat_matmuls(self) -> bool:
        """Whether the model's weight matmuls (transformer.dense) are lowered as 2-D GEMMs, [tokens, in] x
        [in, out], rather than one dot_general over the activation's own shape. CPU targets: XLA's CPU
        backend copies a transposed activation gradient for the weight gradient of a [B, T, D] contraction
        (the `small` preset's MLP backward ran 2.3x slower). Elsewhere the compiler's layout assignment
        does better with the activation's shape: on v6e the 2-D reshapes cost llama3-70b's train step
        2.5 GB of HBM per chip (33.69 -> 31.13 GB with MaxText's recipe settings)."""
        return self.target.platform == "cpu"

    def ways(self, *logical: str) -> int:
        """Into how many parts the layout splits a dimension carrying these logical axes (1 without a layout)."""
        if self.layout is None:
            return 1
        axes = {a for name in logical for a in self.layout.mesh_axes(name)}
        return math.prod(int(self.layout.mesh.shape[a]) for a in axes)

    def pick(self, op: str, **query: Any) -> Impl:
        return resolve(op, self.target, query, self.override(op))

    def with_layout(self, layout: Any) -> "KernelPolicy":
        return dataclasses.replace(self, layout=layout)

    def with_overrides(self, **ov: str) -> "KernelPolicy":
        merged = dict(self.overrides)
        merged.update(ov)
        return dataclasses.replace(self, overrides=tuple(sorted(merged.items())))

    def call(self, op: Op, *args: Any, query: dict, **kwargs: Any):
        """Run `op` the one way every op runs: pick the implementation for `query` (shapes, dtypes,
        options; see `resolve`), pass it the target's device_kind if it wants one, and run it per
        shard when it needs that (`per_shard`): a custom call XLA cannot partition, or an op whose
        `seq` axis the layout splits (context parallelism, through the op's `SeqSplit`).

        Positional args, and keyword args named in `op.args` that are not None, are the arrays, laid
        out by their declared logical axes; every other keyword arg is a static option."""
        names = [n for n, _ in op.args]
        if len(args) > len(names):
            raise TypeError(f"{op.name} takes {len(names)} array arguments, got {len(args)} positional")
        arrays = dict(zip(names, args))
        arrays.update((k, v) for k, v in kwargs.items() if k in names and v is not None)
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        axes = tuple(op.axes(k, jnp.ndim(v)) for k, v in arrays.items())
        split = self.seq_split_axes(op, tuple(arrays.values()), axes)
        if split:
            query = op.seq_split.query(query, math.prod(self.layout.mesh.shape[a] for a in split))
        impl = self.pick(op.name, **query)
        if impl.wants_device_kind:
            static["device_kind"] = self.target.device_kind
        positional = names[:len(args)]

        def call(named: dict):
            kw = {**static, **{k: v for k, v in named.items() if k not in positional}}
            return impl.fn(*(named[k] for k in positional), **kw)

        keys = tuple(arrays)

        def run(*values):
            named = dict(zip(keys, values))
            return call(named) if not split else op.seq_split.wrap(call, named, split)

        return self.per_shard(impl, run, tuple(arrays.values()), axes, psum_outputs=op.partial_sums,
                              force=bool(split))

    def seq_split_axes(self, op: Op, args: tuple, axes: tuple) -> tuple[str, ...]:
        """The mesh axes the first argument's `seq` axis is split over in this call (() when none, or
        when the op declares no SeqSplit)."""
        if op.seq_split is None or self.layout is None or "seq" not in axes[0]:
            return ()
        spec = shard_specs(self.layout, axes, tuple(jnp.shape(a) for a in args))[0]
        part = spec[axes[0].index("seq")] if len(spec) > axes[0].index("seq") else None
        return () if part is None else (tuple(part) if isinstance(part, tuple) else (part,))

    def per_shard(self, impl: Impl, fn: Callable, args: tuple, axes: tuple, psum_outputs: bool = False,
                  force: bool = False):
        """fn(*args), run per shard under shard_map when `impl` is a custom call XLA cannot partition
        (Mosaic, Triton) and the layout's mesh has more than one device, or when `force` (fn then
        holds collectives over the mesh's axes: a split `seq`); otherwise a plain call.

        args: arrays; axes: each one's logical axis names (see `shard_specs`). The output is laid out
        like args[0]; with psum_outputs the outputs are per-shard partial sums (e.g. a loss sum) added
        up over the mesh axes args[0]'s first dimension is split on, and returned replicated."""
        layout = self.layout
        if not (impl.manual_partition or force) or layout is None or layout.mesh.size == 1:
            return fn(*args)
        from jax.sharding import PartitionSpec as P

        specs = tuple(shard_specs(layout, axes, tuple(a.shape for a in args)))
        lead = specs[0][0] if len(specs[0]) else None
        split = () if lead is None else (tuple(lead) if isinstance(lead, tuple) else (lead,))

        def body(*local):
            out = fn(*local)
            if psum_outputs and split:
                out = jax.tree.map(lambda o: jax.lax.psum(o, split), out)
            return out

        out_specs = P() if psum_outputs else specs[0]
        return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)


_LOADED = False


def _ensure_loaded() -> None:
    """Import every op package once so that each declares itself."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pkgutil

    import polychip.kernels as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.ispkg:
            importlib.import_module(f"polychip.kernels.{m.name}")
