"""One registry of kernel implementations per op.

The model asks for an op ("attention", "rms_norm", "cross_entropy", ...) through a `KernelPolicy`
that was fixed once, at the boundary, for the target it is being traced for (which may not be the
host: `compile` traces for a TPU pod on a CPU machine). The registry walks the op's implementations
in priority order and picks the first whose `supported_on(target, query)` returns no reason. A
per-op override names one implementation; if it cannot run, the error lists why, instead of
silently falling back.

Backend files register themselves when imported; a backend whose toolchain is missing (no Triton,
no Mosaic, no NKI) catches its ImportError and registers nothing, so `import polychip` never breaks.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax


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
    #: A custom call XLA cannot partition (Mosaic, Triton): on a multi-device mesh the op's api runs it
    #: per shard under shard_map (see `KernelPolicy.per_shard`).
    manual_partition: bool = False

    def call(self, target: "Target", *args, **kwargs):
        if self.wants_device_kind:
            kwargs["device_kind"] = target.device_kind
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, list[Impl]] = {}


def register(op: str, name: str, *, priority: int, supported_on: SupportFn = always, verified: str = "",
             auto: bool = True, wants_device_kind: bool = False, manual_partition: bool = False):
    """Decorator: add `fn` as implementation `name` of `op`. Lower priority number = tried first.
    auto=False: never chosen automatically, only when named in an override."""

    def deco(fn: Callable) -> Callable:
        impls = [i for i in _REGISTRY.get(op, []) if i.name != name]
        impls.append(Impl(op, name, fn, supported_on, priority, verified, auto, wants_device_kind,
                          manual_partition))
        impls.sort(key=lambda i: i.priority)
        _REGISTRY[op] = impls
        return fn

    return deco


def register_pallas(op: str, backend: str, fn: Callable, *, priority: int, supported_on: SupportFn,
                    interpret_supported_on: SupportFn, verified: str, auto: bool = True,
                    wants_device_kind: bool = False) -> None:
    """Register a Pallas kernel as `pallas_<backend>` and its CPU interpreter (`fn(..., interpret=True)`)
    as `pallas_<backend>_interpret` (priority + 190, auto=False: only tests that name it use it). Both
    are custom calls XLA cannot partition, so both run per shard on a mesh."""
    register(op, f"pallas_{backend}", priority=priority, supported_on=supported_on, verified=verified, auto=auto,
             wants_device_kind=wants_device_kind, manual_partition=True)(fn)
    register(op, f"pallas_{backend}_interpret", priority=priority + 190, supported_on=interpret_supported_on,
             auto=False, manual_partition=True,
             verified=f"executed in CI (CPU, {'Mosaic TPU' if backend == 'tpu' else 'Pallas'} interpreter)")(
        functools.partial(fn, interpret=True))


def optional_backend(module: str):
    """Import a backend module, or None when its toolchain is missing (one registry entry fewer, never
    a broken `import polychip`)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the jax build
        return None


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

    def pick(self, op: str, **query: Any) -> Impl:
        return resolve(op, self.target, query, self.override(op))

    def with_layout(self, layout: Any) -> "KernelPolicy":
        return dataclasses.replace(self, layout=layout)

    def per_shard(self, impl: Impl, fn: Callable, args: tuple, axes: tuple, psum_outputs: bool = False):
        """fn(*args), run per shard under shard_map when `impl` is a custom call XLA cannot partition
        (Mosaic, Triton) and the layout's mesh has more than one device; otherwise a plain call.

        args: arrays; axes: each one's logical axis names (mesh axes that do not divide a dimension are
        dropped, as everywhere). The output is laid out like args[0]; with psum_outputs the outputs are
        per-shard partial sums (e.g. a loss sum) added up over the mesh axes args[0]'s first dimension
        is split on, and returned replicated."""
        layout = self.layout
        if not impl.manual_partition or layout is None or layout.mesh.size == 1:
            return fn(*args)
        from jax.sharding import PartitionSpec as P

        specs = tuple(layout.spec(ax, a.shape) for ax, a in zip(axes, args))
        lead = specs[0][0] if len(specs[0]) else None
        split = () if lead is None else (tuple(lead) if isinstance(lead, tuple) else (lead,))

        def body(*local):
            out = fn(*local)
            if psum_outputs and split:
                out = jax.tree.map(lambda o: jax.lax.psum(o, split), out)
            return out

        out_specs = P() if psum_outputs else specs[0]
        return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)

    def with_overrides(self, **ov: str) -> "KernelPolicy":
        merged = dict(self.overrides)
        merged.update(ov)
        return dataclasses.replace(self, overrides=tuple(sorted(merged.items())))


_LOADED = False


def _ensure_loaded() -> None:
    """Import every op package once so that their backends register."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    import polychip.kernels as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.ispkg:
            importlib.import_module(f"polychip.kernels.{m.name}")
