"""Parse quantities with units as users write them in fleet files and on the command line.

Every parser takes the raw YAML value and returns an SI float (W, s, hours where named, tokens),
raising ValueError with a short reason; the fleet parser adds file, line and field.
"""
from __future__ import annotations

import datetime as _dt
import math
import re

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"

_POWER = {"w": 1.0, "kw": 1e3, "mw": 1e6, "gw": 1e9}
_HOURS = {"s": 1 / 3600, "sec": 1 / 3600, "min": 1 / 60, "m": 1 / 60, "h": 1.0, "hr": 1.0, "d": 24.0, "day": 24.0,
          "days": 24.0, "w": 168.0, "wk": 168.0, "week": 168.0, "weeks": 168.0}
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0}
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def _split(value, what: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"expected a finite {what}, got {value!r}")
        return v, ""
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {value!r}")
    m = re.fullmatch(_NUM + r"\s*([A-Za-z/]*)", value.strip().replace("_", ""))
    if not m:
        raise ValueError(f"expected {what}, got {value!r}")
    return float(m.group(1)), m.group(2).lower()


def _positive(v: float, raw, what: str, allow_zero: bool = False) -> float:
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else 'positive'}, got {raw!r}")
    return v


def power_w(value) -> float:
    """'500MW', '1.2 GW', '700 W', 700 (watts) -> watts."""
    v, u = _split(value, "a power like '500 MW'")
    if u == "":
        return _positive(v, value, "power")
    if u not in _POWER:
        raise ValueError(f"unknown power unit {u!r} in {value!r} (use W, kW, MW, GW)")
    return _positive(v * _POWER[u], value, "power")


def hours(value, allow_zero: bool = True) -> float:
    """'30d', '12h', '2w', 36 (hours) -> hours."""
    v, u = _split(value, "a duration like '30d' or '12h'")
    if u not in _HOURS and u != "":
        raise ValueError(f"unknown duration unit {u!r} in {value!r} (use h, d, w)")
    return _positive(v * _HOURS.get(u, 1.0), value, "duration", allow_zero)


def seconds(value) -> float:
    """'200ms', '0.2s', 0.2 (seconds) -> seconds."""
    v, u = _split(value, "a latency like '200ms'")
    if u not in _SECONDS and u != "":
        raise ValueError(f"unknown latency unit {u!r} in {value!r} (use ms, s)")
    return _positive(v * _SECONDS.get(u, 1.0), value, "latency")


def count(value, what: str = "count") -> float:
    """'2T', '500B', '1.5M', 15e12 -> a number (tokens, requests)."""
    v, u = _split(value, f"a {what} like '2T' or 1.5e12")
    if u not in _COUNT:
        raise ValueError(f"unknown suffix {u!r} in {value!r} (use K, M, B, T)")
    return _positive(v * _COUNT[u], value, what)


def rate_per_s(value) -> float:
    """'50/s', '3000/min', 50 -> per second."""
    if isinstance(value, str) and "/" in value:
        num, per = value.rsplit("/", 1)
        per = per.strip().lower()
        div = {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}.get(per)
        if div is None:
            raise ValueError(f"unknown rate unit '/{per}' in {value!r} (use /s, /min, /h)")
        return count(num.strip(), "rate") / div
    return count(value, "rate")


def at_hours(value, start: _dt.datetime | None) -> float:
    """A moment as hours after the plan start: a duration ('10d') or a date ('2026-09-10')."""
    if isinstance(value, (_dt.date, _dt.datetime)) or (isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d.*", value)):
        if start is None:
            raise ValueError(f"a date ({value}) needs a top-level 'start:' date to measure from")
        when = value if isinstance(value, (_dt.date, _dt.datetime)) else _parse_date(value)
        if not isinstance(when, _dt.datetime):
            when = _dt.datetime(when.year, when.month, when.day)
        h = (when - start).total_seconds() / 3600
        if h < 0:
            raise ValueError(f"{value} is before the plan start {start.date()}")
        return h
    return hours(value)


def _parse_date(text: str) -> _dt.datetime:
    try:
        return _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def start_date(value) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        return value
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        return _parse_date(value)
    raise ValueError(f"expected a date like 2026-09-01, got {value!r}")
