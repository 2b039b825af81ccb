"""The chip catalog: one packaged data file (catalog.yaml) -> frozen `Chip` records.

Units inside `Chip` are SI: FLOP/s, bytes, bytes/s, watts, USD per chip-hour. The YAML file uses
the units the sources quote (TFLOP/s, GB or GiB, TB/s, GB/s); `_parse_chip` converts.

float32 peak: none of the sources quotes an fp32 figure for these accelerators, and none is
invented here. `Chip.peak("float32")` returns the bfloat16 figure for accelerators and says so in
`Chip.peak_basis("float32")`: XLA runs fp32 matmuls on the same matrix units (TPU MXU at default
precision: one bf16 pass; NVIDIA: TF32 tensor cores, half the bf16 rate on H100), so MFU of an
fp32 run is reported against the chip's bf16 peak, the conventional MFU denominator. For the CPU
(see detect.py) every figure is measured.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from polychip import yamlpos


class HardwareError(ValueError):
    """A user mistake about hardware: unknown chip name, bad catalog file. Message names the problem."""


#: Canonical dtype names and the spellings accepted for them.
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp8": "float8", "float8": "float8", "float8_e4m3fn": "float8", "float8_e5m2": "float8", "mxfp8": "float8",
    "int8": "int8",
    "fp32": "float32", "float32": "float32", "f32": "float32", "tf32": "float32",
    "fp16": "float16", "float16": "float16", "f16": "float16",
}


def canonical_dtype(dtype: Any) -> str:
    """'bf16' / jnp.bfloat16 / 'bfloat16' -> 'bfloat16'. Raises HardwareError for unknown names."""
    name = getattr(dtype, "__name__", None) or getattr(dtype, "name", None) or str(dtype)
    key = str(name).lower()
    if key not in _DTYPE_ALIASES:
        raise HardwareError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(set(_DTYPE_ALIASES.values())))}")
    return _DTYPE_ALIASES[key]


@dataclass(frozen=True)
class Chip:
    """One accelerator model (per-chip figures). Fields a source marks uncertain are in `uncertain`."""

    name: str
    vendor: str
    family: str  # tpu | trainium | inferentia | gpu | cpu
    #: dtype -> dense peak FLOP/s per chip, e.g. {"bfloat16": 9.18e14, "float8": 9.18e14}.
    peak_flops: dict = field(hash=False)
    hbm_bytes: float | None
    #: bytes/s per chip.
    hbm_bandwidth: float | None
    #: bytes/s per chip over the chip-to-chip interconnect; None where no figure is published.
    link_bandwidth: float | None
    #: bytes/s per chip over the scale-out network between slices / nodes (TPU DCN, InfiniBand, EFA);
    #: None where no figure is published.
    scaleout_bandwidth: float | None
    power_w: float | None
    chips_per_host: int
    #: USD per chip-hour (on-demand list); None where none is published.
    price_per_hour: float | None
    price_date: str | None
    sources: tuple[str, ...]
    #: Field names whose figure is not firm (not published, approximate, secondary source).
    uncertain: tuple[str, ...] = ()
    #: Why each uncertain field is uncertain.
    uncertain_why: dict = field(default_factory=dict, hash=False, compare=False)
    #: Strings jax.Device.device_kind reports for this chip.
    device_kinds: tuple[str, ...] = ()
    #: Topology name prefix for jax.experimental.topologies.get_topology_desc ("v5e" in "v5e:2x2").
    topology_prefix: str | None = None
    #: JAX devices per physical chip at run time (tpu7x: 2 TensorCores, 2 devices).
    devices_per_chip: int = 1
    #: JAX devices per chip in a deviceless topology description (v4 shows its 2 cores there).
    topology_devices_per_chip: int = 1
    display: str = ""
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def peak(self, dtype: Any = "bfloat16") -> float | None:
        """Dense peak FLOP/s per chip for `dtype`, or None when unknown (then MFU is n/a).

        Missing float32/float16 entries fall back to the bfloat16 figure (see module docstring);
        missing float8/int8 entries do not fall back (None).
        """
        d = canonical_dtype(dtype)
        if d in self.peak_flops:
            return self.peak_flops[d]
        if d in ("float32", "float16") and "bfloat16" in self.peak_flops:
            return self.peak_flops["bfloat16"]
        return None

    def peak_basis(self, dtype: Any = "bfloat16") -> str:
        """One line saying which figure `peak(dtype)` returns and why."""
        d = canonical_dtype(dtype)
        if d in self.peak_flops:
            return f"{d} figure from {'measurement' if self.family == 'cpu' else 'catalog'}"
        if self.peak(d) is not None:
            return (f"no {d} figure; bfloat16 peak used (XLA runs {d} matmuls on the bf16 matrix units; "
                    "conventional MFU denominator)")
        return f"no {d} figure for {self.name}"

    def device_peak(self, dtype: Any = "bfloat16") -> float | None:
        """Peak FLOP/s per JAX device (chip peak / devices_per_chip)."""
        p = self.peak(dtype)
        return None if p is None else p / self.devices_per_chip

    def is_uncertain(self, field_name: str) -> bool:
        return field_name in self.uncertain


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
_REQUIRED = ("vendor", "family", "peak", "hbm", "hbm_bandwidth", "chips_per_host", "sources")
_KNOWN = set(_REQUIRED) | {
    "display", "aliases", "link_bandwidth", "scaleout_bandwidth", "power_w", "price_per_hour", "price_date", "device_kinds",
    "topology_prefix", "devices_per_chip", "topology_devices_per_chip", "notes", "uncertain",
}
_MEM_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _Ctx:
    def __init__(self, file: str, lines: dict):
        self.file, self.lines = file, lines

    def err(self, path: tuple, msg: str) -> HardwareError:
        return HardwareError(f"{yamlpos.where(self.file, self.lines, path)}: {msg}")

    def number(self, v: Any, path: tuple, allow_none: bool = False, positive: bool = True) -> float | None:
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(path, f"must be a number{' or null' if allow_none else ''}, got {v!r}")
        if positive and v <= 0:
            raise self.err(path, f"must be positive, got {v!r}")
        return float(v)


def _parse_mem(ctx: _Ctx, v: Any, path: tuple) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ctx.number(v, path)  # plain number: bytes
    if isinstance(v, str):
        parts = v.replace("_", "").split()
        if len(parts) == 2 and parts[1].lower() in _MEM_UNITS:
            try:
                return ctx.number(float(parts[0]), path) * _MEM_UNITS[parts[1].lower()]
            except ValueError:
                pass
    raise ctx.err(path, f"must be a size like '32 GB' or '192 GiB' (or bytes), got {v!r}")


def _str_list(ctx: _Ctx, v: Any, path: tuple) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ctx.err(path, f"must be a list of strings, got {v!r}")
    return tuple(v)


def _parse_chip(ctx: _Ctx, name: str, e: dict) -> Chip:
    base = ("chips", name)
    if not isinstance(e, dict):
        raise ctx.err(base, f"must be a mapping of fields, got {e!r}")
    unknown = sorted(set(e) - _KNOWN)
    if unknown:
        raise ctx.err(base + (unknown[0],), f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_KNOWN))}")
    missing = [k for k in _REQUIRED if k not in e]
    if missing:
        raise ctx.err(base, f"missing field {missing[0]!r} (required: {', '.join(_REQUIRED)})")
    peak = e["peak"]
    if not isinstance(peak, dict) or not peak:
        raise ctx.err(base + ("peak",), f"must map dtype -> TFLOP/s, e.g. {{bfloat16: 918}}, got {peak!r}")
    peak_flops = {}
    for dt, tf in peak.items():
        try:
            cd = canonical_dtype(dt)
        except HardwareError as err:
            raise ctx.err(base + ("peak", dt), str(err)) from None
        peak_flops[cd] = ctx.number(tf, base + ("peak", dt)) * 1e12
    unc = e.get("uncertain") or {}
    if isinstance(unc, list):
        unc = {k: "" for k in unc}
    if not isinstance(unc, dict):
        raise ctx.err(base + ("uncertain",), f"must map field -> reason, got {unc!r}")
    bad = [k for k in unc if k not in _KNOWN]
    if bad:
        raise ctx.err(base + ("uncertain", bad[0]), f"names no chip field {bad[0]!r}")
    sources = _str_list(ctx, e["sources"], base + ("sources",))
    if not sources:
        raise ctx.err(base + ("sources",), "must list at least one source")
    link = ctx.number(e.get("link_bandwidth"), base + ("link_bandwidth",), allow_none=True)
    scaleout = ctx.number(e.get("scaleout_bandwidth"), base + ("scaleout_bandwidth",), allow_none=True)
    hbm_bw = ctx.number(e["hbm_bandwidth"], base + ("hbm_bandwidth",))
    price = ctx.number(e.get("price_per_hour"), base + ("price_per_hour",), allow_none=True)
    cph = ctx.number(e["chips_per_host"], base + ("chips_per_host",))
    dpc = ctx.number(e.get("devices_per_chip", 1), base + ("devices_per_chip",))
    tdpc = ctx.number(e.get("topology_devices_per_chip", dpc), base + ("topology_devices_per_chip",))
    for key, val in (("chips_per_host", cph), ("devices_per_chip", dpc), ("topology_devices_per_chip", tdpc)):
        if val != int(val):
            raise ctx.err(base + (key,), f"must be a whole number, got {val!r}")
    pd = e.get("price_date")
    return Chip(
        name=name,
        vendor=str(e["vendor"]),
        family=str(e["family"]),
        peak_flops=peak_flops,
        hbm_bytes=_parse_mem(ctx, e["hbm"], base + ("hbm",)),
        hbm_bandwidth=hbm_bw * 1e12,
        link_bandwidth=None if link is None else link * 1e9,
        scaleout_bandwidth=None if scaleout is None else scaleout * 1e9,
        power_w=ctx.number(e.get("power_w"), base + ("power_w",), allow_none=True),
        chips_per_host=int(cph),
        price_per_hour=price,
        price_date=None if pd is None else str(pd),
        sources=sources,
        uncertain=tuple(unc),
        uncertain_why={k: str(v or "") for k, v in unc.items()},
        device_kinds=_str_list(ctx, e.get("device_kinds"), base + ("device_kinds",)),
        topology_prefix=e.get("topology_prefix"),
        devices_per_chip=int(dpc),
        topology_devices_per_chip=int(tdpc),
        display=str(e.get("display") or name),
        aliases=_str_list(ctx, e.get("aliases"), base + ("aliases",)),
        notes=str(e.get("notes") or ""),
    )


def _read_entries(path: Path | None, text: str | None = None) -> tuple[dict, _Ctx]:
    name = str(path) if path is not None else "catalog.yaml"
    if text is None:
        if not path.is_file():
            raise HardwareError(f"catalog file {name!r} not found")
    try:
        if text is None:
            text = yamlpos.read_text(path, name)
        data, lines = yamlpos.load(text, name)
    except yamlpos.YamlSyntaxError as e:
        raise HardwareError(str(e)) from None
    ctx = _Ctx(name, lines)
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {"chips"}:
        raise ctx.err((), "must hold one top-level key 'chips' mapping chip name -> fields")
    chips = data.get("chips") or {}
    if not isinstance(chips, dict):
        raise ctx.err(("chips",), "must map chip name -> fields")
    return chips, ctx


_BUILTIN: dict[str, Chip] | None = None


def builtin_text() -> str:
    return resources.files("polychip.hardware").joinpath("catalog.yaml").read_text()


def load_catalog(path: str | Path | None = None) -> dict[str, Chip]:
    """The catalog: the packaged one, with the user file at `path` (same layout) merged over it. The one
    way to reach chip facts; callers that take a user file (`plan --catalog`) pass the result on.

    A user entry for an existing chip changes only the fields it names (e.g. price_per_hour and
    price_date); a new name must give every required field. Raises HardwareError naming file, line
    and field on a bad file.
    """
    global _BUILTIN
    if _BUILTIN is None:
        entries, ctx = _read_entries(None, builtin_text())
        _BUILTIN = {n: _parse_chip(ctx, n, e) for n, e in entries.items()}
    if path is None:
        return dict(_BUILTIN)
    raw_builtin, _ = _read_entries(None, builtin_text())
    user, uctx = _read_entries(Path(path))
    out = dict(_BUILTIN)
    for n, e in user.items():
        n = str(n)
        if n in raw_builtin and isinstance(e, dict):
            merged = copy.deepcopy(raw_builtin[n])
            # A user price is the user's figure: drop the catalog's doubt about it unless restated.
            for k in e:
                if isinstance(merged.get("uncertain"), dict):
                    merged["uncertain"].pop(k, None)
            merged.update(e)
            merged.setdefault("sources", [])
            merged["sources"] = list(merged["sources"]) + [f"user catalog {path}"]
            out[n] = _parse_chip(uctx, n, merged)
        else:
            out[n] = _parse_chip(uctx, n, e)
    return out


def _norm(s: str) -> str:
    return s.lower().replace("_", "-").replace(" ", "-")


def get_chip(name: str, catalog: dict[str, Chip] | None = None) -> Chip:
    """Chip by name or alias (case-insensitive). Unknown -> HardwareError listing valid names."""
    cat = catalog if catalog is not None else load_catalog()
    if name in cat:
        return cat[name]
    key = _norm(str(name))
    for chip in cat.values():
        if key == _norm(chip.name) or key in (_norm(a) for a in chip.aliases):
            return chip
    raise HardwareError(f"unknown chip {name!r}; valid names: {', '.join(sorted(cat))}")


def chip_for_device_kind(kind: str, catalog: dict[str, Chip] | None = None) -> Chip | None:
    """The catalog chip whose device_kinds contains `kind` (exact match first, then case-insensitive)."""
    cat = catalog if catalog is not None else load_catalog()
    for chip in cat.values():
        if kind in chip.device_kinds:
            return chip
    low = kind.strip().lower()
    for chip in cat.values():
        if low in (k.lower() for k in chip.device_kinds):
            return chip
    return None
