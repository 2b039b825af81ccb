"""One tolerance rule for kernel-vs-reference checks.

Rule: a kernel output in dtype `dt` whose elements each come out of a reduction over `n` terms may
differ from the float32 HIGHEST-precision reference by at most

    tol = C * eps(dt) * sqrt(n)      (C = 4 by default)

relative to the reference's scale (max |ref|, so values near zero are not held to a relative bound
they cannot meet). eps(dt) is the unit round-off of the dtype the kernel *rounds through* (bf16
inputs are rounded to bf16 before any arithmetic, so eps(bf16) = 2^-8 dominates); sqrt(n) is the
random-walk growth of rounding error over n accumulated terms. float32 thus allows ~5e-7 * sqrt(n),
bf16 ~1.6e-2 * sqrt(n) -- still tight enough that a wrong mask, a dropped block or an off-by-one
page moves the error by orders of magnitude.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def eps(dtype) -> float:
    return float(jnp.finfo(jnp.dtype(dtype)).eps)


def tol(dtype, n: int, c: float = 4.0) -> float:
    return c * eps(dtype) * math.sqrt(max(1, n))


def max_rel_err(actual, ref) -> float:
    """max |actual - ref| / max |ref| (both compared in float64)."""
    a = np.asarray(actual, np.float64)
    r = np.asarray(ref, np.float64)
    scale = max(float(np.max(np.abs(r))), 1e-30)
    return float(np.max(np.abs(a - r))) / scale


def assert_close(actual, ref, dtype, n: int, c: float = 4.0, what: str = ""):
    assert np.shape(actual) == np.shape(ref), f"{what}: shape {np.shape(actual)} != {np.shape(ref)}"
    a = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err, t = max_rel_err(actual, ref), tol(dtype, n, c)
    assert err <= t, f"{what}: max relative error {err:.3g} > tol {t:.3g} (dtype {jnp.dtype(dtype).name}, n={n})"
