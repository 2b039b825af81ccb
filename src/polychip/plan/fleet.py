"""The fleet file: chip pools, a site power cap, training runs and inference services.

Schema (YAML; quantities take units, see plan/units.py):

    start: 2026-09-01            # optional; dates below are measured from it
    horizon: 30d                 # planning period: services run for it, reserved pools are paid for it
    site:
      power_cap: 500 MW          # optional cap on the summed power of every placement at once
      power_overhead: 1.0        # multiplier on chip power (cooling, hosts); 1.0 = chips only
      require_power: false       # true: a pool whose chip has no published power must set power_w
    pools:
      - name: gcp-v6e-east       # unique
        chip: tpu-v6e            # catalog name or alias
        count: 4096              # chips
        cloud: gcp               # optional, for launch specs
        region: us-east5         # optional
        price: 2.10              # optional USD per chip-hour; default: catalog on-demand price
        pricing: on-demand       # or reserved (paid for the whole horizon; using it costs nothing more)
        power_w: 300             # optional per-chip watts; default: catalog, else a labelled estimate
        available: 10d           # optional earliest availability (duration after start, or a date)
    workloads:
      - name: pretrain-8b
        kind: train
        model: llama3-8b         # preset name, or a mapping of ModelConfig fields
        tokens: 2T
        seq_len: 8192            # optional; default from the preset
        batch: 256               # optional global batch in sequences; default from the preset
        deadline: 20d            # optional (duration after start, or a date)
        chips: [tpu-v6e, h100]   # optional allowed chip kinds; default all
        min_chips: 64            # optional
        max_chips: 2048          # optional
        max_tensor: 8            # optional largest tensor-parallel degree (default 8)
        remat: auto              # auto (the fastest policy that fits) | a config.REMAT_POLICIES name
        dtype: bfloat16          # optional linear-layer matmuls: bfloat16 | float8 (at the chip's fp8 rate)
        layout: {fsdp: 64, tensor: 4}  # optional: price this parallel layout only (degrees: data, fsdp,
                                 # tensor, stage, context, virtual; zero1: true|false); the run then takes
                                 # exactly product(degrees) devices (chips x the chip's devices per chip)
        grad_accum: 1            # optional micro-batches per step (default: the fastest that fits)
      - name: chat-70b
        kind: serve
        model: llama3-70b
        rate: 40/s               # requests per second to sustain
        prompt_tokens: 1800
        output_tokens: 256
        ttft: 2s                 # optional time-to-first-token target
        tpot: 60ms               # optional time-per-output-token target
        dtype: bfloat16          # weights: bfloat16 | float8
        chips: [h100, tpu-v6e]
"""
from __future__ import annotations

import dataclasses
import math
import datetime as _dt
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polychip.config import MODEL_PRESETS, REMAT_POLICIES, TRAIN_PRESETS, ConfigError, ModelConfig, from_dict
from polychip.estimate.analytic import Layout
from polychip.hardware import Chip, HardwareError, get_chip, load_catalog
from polychip import yamlpos
from polychip.plan import units
from polychip.plan.errors import PlanError


@dataclass(frozen=True)
class Pool:
    name: str
    chip: Chip
    count: int
    cloud: str = ""
    region: str = ""
    #: USD per chip-hour (None: no price known; cost is then n/a and the objective cannot use it).
    price_per_hour: float | None = None
    price_source: str = ""
    #: "on-demand" (pay per chip-hour used) or "reserved" (paid for the whole horizon).
    pricing: str = "on-demand"
    power_w: float | None = None
    power_source: str = ""
    #: True when power_w is the planner's estimate, not a published or user figure.
    power_estimated: bool = False
    available_h: float = 0.0
    line: int | None = None


@dataclass(frozen=True)
class TrainWorkload:
    name: str
    model: ModelConfig
    model_name: str
    tokens: float
    seq_len: int
    batch: int
    deadline_h: float | None = None
    chips: tuple[str, ...] = ()
    min_chips: int = 1
    max_chips: int | None = None
    max_tensor: int = 8
    #: auto (the fastest config.REMAT_POLICIES policy that fits) or one policy name.
    remat: str = "auto"
    #: Linear-layer matmul dtype: bfloat16, or float8 (priced at the chip's fp8 rate; estimate.analytic).
    dtype: str = "bfloat16"
    #: A parallel layout the user fixed (analytic.Layout; nodes filled in per chip), or None: the planner's
    #: fastest fitting layout. grad_accum: micro-batches the user fixed, or None.
    layout: Layout | None = None
    grad_accum: int | None = None
    line: int | None = None
    kind: str = "train"


@dataclass(frozen=True)
class ServeWorkload:
    name: str
    model: ModelConfig
    model_name: str
    rate: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    chips: tuple[str, ...] = ()
    dtype: str = "bfloat16"
    line: int | None = None
    kind: str = "serve"


@dataclass
class Fleet:
    pools: list[Pool]
    workloads: list
    horizon_h: float = 720.0
    start: _dt.datetime | None = None
    power_cap_w: float | None = None
    power_overhead: float = 1.0
    require_power: bool = False
    path: str = "<fleet>"

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise PlanError(f"no pool named {name!r}; pools: {', '.join(p.name for p in self.pools)}")


def power_estimate(chip: Chip, catalog: dict[str, Chip]) -> tuple[float, str]:
    """Watts for a chip with no published power: its bf16 peak times the median W per bf16 FLOP/s
    of the catalog chips whose power is published and not flagged uncertain. Always labelled."""
    firm = sorted((c.name, c.power_w / c.peak("bfloat16")) for c in catalog.values()
                  if c.power_w and not c.is_uncertain("power_w") and c.peak("bfloat16"))
    if not firm:
        raise PlanError(f"no published chip power to estimate {chip.name}'s from; set power_w on its pool")
    w_per_flop = statistics.median(r for _, r in firm)
    watts = chip.peak("bfloat16") * w_per_flop
    why = (f"ESTIMATE: {chip.name} power is not published; {watts:.0f} W = bf16 peak x "
           f"{w_per_flop * 1e12:.2f} W per TFLOP/s (median of {', '.join(n for n, _ in firm)})")
    return watts, why


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
class _P:
    """Field readers that raise PlanError naming file, line and field."""

    def __init__(self, name: str, lines: dict):
        self.name, self.lines = name, lines

    def err(self, path: tuple, msg: str) -> PlanError:
        return PlanError(f"{yamlpos.where(self.name, self.lines, path)}: {msg}")

    def conv(self, fn, value, path: tuple, *a):
        try:
            return fn(value, *a)
        except ValueError as e:
            raise self.err(path, str(e)) from None

    def int_(self, value, path: tuple, minimum: int = 1) -> int:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value)):
            raise self.err(path, f"must be a whole number, got {value!r}")
        if value < minimum:
            raise self.err(path, f"must be >= {minimum}, got {value!r}")
        return int(value)

    def str_(self, value, path: tuple, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.err(path, f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.err(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def mapping(self, value, path: tuple, known: set[str], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.err(path, f"must be a mapping, got {value!r}")
        for k in value:
            if k not in known:
                raise self.err(path + (k,), f"unknown field {k!r}; known: {', '.join(sorted(known))}")
        for k in required:
            if k not in value or value[k] is None:
                raise self.err(path, f"missing field {k!r}")
        return value


_TOP = {"start", "horizon", "site", "pools", "workloads"}
_SITE = {"power_cap", "power_overhead", "require_power"}
_POOL = {"name", "chip", "count", "cloud", "region", "price", "pricing", "power_w", "available"}
_TRAIN = {"name", "kind", "model", "tokens", "seq_len", "batch", "deadline", "chips", "min_chips", "max_chips",
          "max_tensor", "remat", "dtype", "layout", "grad_accum"}
_LAYOUT = {"data", "fsdp", "tensor", "stage", "context", "virtual", "zero1"}
_SERVE = {"name", "kind", "model", "rate", "prompt_tokens", "output_tokens", "ttft", "tpot", "dtype", "chips"}


def _model(p: _P, value, path: tuple) -> tuple[ModelConfig, str]:
    if isinstance(value, str):
        if value not in MODEL_PRESETS:
            raise p.err(path, f"unknown model preset {value!r}; presets: {', '.join(MODEL_PRESETS)}")
        return MODEL_PRESETS[value], value
    if isinstance(value, dict):
        try:
            return from_dict(ModelConfig, value, "model"), "custom"
        except ConfigError as e:
            raise p.err(path, str(e)) from None
    raise p.err(path, f"must be a preset name or a mapping of model fields, got {value!r}")


def _chips(p: _P, value, path: tuple, catalog: dict) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise p.err(path, f"must be a list of chip names, got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str) and v in catalog:  # fast path for canonical names (large fleet files)
            out.append(v)
            continue
        try:
            out.append(get_chip(str(v), catalog).name)
        except HardwareError as e:
            raise p.err(path + (i,), str(e)) from None
    return tuple(out)


def _pool(p: _P, d, path: tuple, catalog: dict, start, horizon_h: float, require_power: bool) -> Pool:
    d = p.mapping(d, path, _POOL, ("name", "chip", "count"))
    name = p.str_(d["name"], path + ("name",))
    try:
        chip = get_chip(str(d["chip"]), catalog)
    except HardwareError as e:
        raise p.err(path + ("chip",), str(e)) from None
    count = p.int_(d["count"], path + ("count",), minimum=1)
    if d.get("price") is not None:
        price = p.conv(units.count, d["price"], path + ("price",), "price")
        price_src = "fleet file"
    else:
        price = chip.price_per_hour
        price_src = f"catalog ({chip.price_date or 'undated'})" if price is not None else "no price published"
        if chip.is_uncertain("price_per_hour"):
            price_src += f"; UNCERTAIN: {chip.uncertain_why.get('price_per_hour', '')}"
    pricing = p.str_(d.get("pricing", "on-demand"), path + ("pricing",), ("on-demand", "reserved"))
    est = False
    if d.get("power_w") is not None:
        power = p.conv(units.power_w, d["power_w"], path + ("power_w",))
        power_src = "fleet file"
    elif chip.power_w is not None:
        power = chip.power_w
        power_src = "catalog" + (f"; UNCERTAIN: {chip.uncertain_why.get('power_w', '')}"
                                 if chip.is_uncertain("power_w") else "")
    elif require_power:
        raise p.err(path + ("power_w",), f"chip {chip.name} has no published power and site.require_power is "
                                         "true: give power_w (watts per chip) for this pool")
    else:
        power, power_src = power_estimate(chip, catalog)
        est = True
    avail = p.conv(units.at_hours, d.get("available", 0), path + ("available",), start) if "available" in d else 0.0
    if avail >= horizon_h:
        raise p.err(path + ("available",), f"pool becomes available at {avail:.0f} h, after the {horizon_h:.0f} h horizon")
    return Pool(name=name, chip=chip, count=count, cloud=str(d.get("cloud", "") or ""),
                region=str(d.get("region", "") or ""), price_per_hour=price, price_source=price_src, pricing=pricing,
                power_w=power, power_source=power_src, power_estimated=est, available_h=avail,
                line=yamlpos.line_of(p.lines, path))


def _train(p: _P, d, path: tuple, catalog: dict, start) -> TrainWorkload:
    d = p.mapping(d, path, _TRAIN, ("name", "model", "tokens"))
    model, mname = _model(p, d["model"], path + ("model",))
    tp = TRAIN_PRESETS.get(mname, {})
    seq = p.int_(d.get("seq_len", tp.get("seq_len", min(4096, model.max_seq_len))), path + ("seq_len",))
    if seq > model.max_seq_len:
        raise p.err(path + ("seq_len",), f"{seq} exceeds the model's max_seq_len {model.max_seq_len}")
    batch = p.int_(d.get("batch", tp.get("batch_size", 256)), path + ("batch",))
    mn = p.int_(d.get("min_chips", 1), path + ("min_chips",))
    mx = p.int_(d["max_chips"], path + ("max_chips",)) if d.get("max_chips") is not None else None
    if mx is not None and mx < mn:
        raise p.err(path + ("max_chips",), f"max_chips {mx} is below min_chips {mn}")
    dl = p.conv(units.at_hours, d["deadline"], path + ("deadline",), start) if d.get("deadline") is not None else None
    if dl is not None and dl <= 0:
        raise p.err(path + ("deadline",), "must be after the plan start")
    return TrainWorkload(
        name=p.str_(d["name"], path + ("name",)), model=model, model_name=mname,
        tokens=p.conv(units.count, d["tokens"], path + ("tokens",), "token count"), seq_len=seq, batch=batch,
        deadline_h=dl, chips=_chips(p, d.get("chips"), path + ("chips",), catalog), min_chips=mn, max_chips=mx,
        max_tensor=p.int_(d.get("max_tensor", 8), path + ("max_tensor",)),
        remat=p.str_(d.get("remat", "auto"), path + ("remat",), ("auto", *REMAT_POLICIES)),
        dtype=p.str_(d.get("dtype", "bfloat16"), path + ("dtype",), ("bfloat16", "float8")),
        layout=_layout(p, d["layout"], path + ("layout",)) if d.get("layout") is not None else None,
        grad_accum=p.int_(d["grad_accum"], path + ("grad_accum",)) if d.get("grad_accum") is not None else None,
        line=yamlpos.line_of(p.lines, path))


def _layout(p: _P, d, path: tuple):
    """A fixed parallel layout: positive whole degrees, zero1 a boolean."""
    d = p.mapping(d, path, _LAYOUT)
    kw = {k: p.int_(v, path + (k,)) for k, v in d.items() if k != "zero1"}
    if "zero1" in d:
        if not isinstance(d["zero1"], bool):
            raise p.err(path + ("zero1",), f"must be true or false, got {d['zero1']!r}")
        kw["zero1"] = d["zero1"]
    return Layout(**kw)


def _serve(p: _P, d, path: tuple, catalog: dict) -> ServeWorkload:
    d = p.mapping(d, path, _SERVE, ("name", "model", "rate", "prompt_tokens", "output_tokens"))
    model, mname = _model(p, d["model"], path + ("model",))
    pt = p.int_(d["prompt_tokens"], path + ("prompt_tokens",))
    ot = p.int_(d["output_tokens"], path + ("output_tokens",))
    if pt + ot > model.max_seq_len:
        raise p.err(path + ("output_tokens",), f"prompt_tokens + output_tokens = {pt + ot} exceeds the model's "
                                               f"max_seq_len {model.max_seq_len}")
    return ServeWorkload(
        name=p.str_(d["name"], path + ("name",)), model=model, model_name=mname,
        rate=p.conv(units.rate_per_s, d["rate"], path + ("rate",)), prompt_tokens=pt, output_tokens=ot,
        ttft_s=p.conv(units.seconds, d["ttft"], path + ("ttft",)) if d.get("ttft") is not None else None,
        tpot_s=p.conv(units.seconds, d["tpot"], path + ("tpot",)) if d.get("tpot") is not None else None,
        chips=_chips(p, d.get("chips"), path + ("chips",), catalog),
        dtype=p.str_(d.get("dtype", "bfloat16"), path + ("dtype",), ("bfloat16", "float8")),
        line=yamlpos.line_of(p.lines, path))


def parse_fleet(text: str, name: str = "<fleet>", catalog: dict[str, Chip] | None = None) -> Fleet:
    """Fleet from YAML text. Raises PlanError('NAME line N, field F: reason') on any bad input."""
    catalog = catalog if catalog is not None else load_catalog()
    try:
        data, lines = yamlpos.load(text, name)
    except yamlpos.YamlSyntaxError as e:
        raise PlanError(str(e)) from None
    p = _P(name, lines)
    data = p.mapping(data if data is not None else {}, (), _TOP, ("pools", "workloads"))
    start = p.conv(units.start_date, data["start"], ("start",)) if data.get("start") is not None else None
    horizon = p.conv(units.hours, data.get("horizon", "30d"), ("horizon",), False)
    site = p.mapping(data.get("site") or {}, ("site",), _SITE)
    cap = p.conv(units.power_w, site["power_cap"], ("site", "power_cap")) if site.get("power_cap") is not None else None
    overhead = p.conv(units.count, site.get("power_overhead", 1.0), ("site", "power_overhead"), "overhead")
    req = site.get("require_power", False)
    if not isinstance(req, bool):
        raise p.err(("site", "require_power"), f"must be true or false, got {req!r}")
    for key in ("pools", "workloads"):
        if not isinstance(data[key], list) or not data[key]:
            raise p.err((key,), "must be a non-empty list")
    pools = [_pool(p, d, ("pools", i), catalog, start, horizon, req) for i, d in enumerate(data["pools"])]
    workloads: list = []
    for i, d in enumerate(data["workloads"]):
        path = ("workloads", i)
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "train":
            workloads.append(_train(p, d, path, catalog, start))
        elif kind == "serve":
            workloads.append(_serve(p, d, path, catalog))
        else:
            raise p.err(path + ("kind",), f"must be train or serve, got {kind!r}")
    for key, items in (("pools", pools), ("workloads", workloads)):
        seen: set[str] = set()
        for i, it in enumerate(items):
            if it.name in seen:
                raise p.err((key, i, "name"), f"duplicate name {it.name!r}")
            seen.add(it.name)
    return Fleet(pools=pools, workloads=workloads, horizon_h=horizon, start=start, power_cap_w=cap,
                 power_overhead=overhead, require_power=req, path=name)


def load_fleet(path: str | Path, catalog: dict[str, Chip] | None = None) -> Fleet:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"fleet file {str(path)!r} not found")
    try:
        text = yamlpos.read_text(path)
    except yamlpos.YamlSyntaxError as e:
        raise PlanError(str(e)) from None
    return parse_fleet(text, str(path), catalog)


def replace(obj: Any, **kw) -> Any:
    return dataclasses.replace(obj, **kw)
