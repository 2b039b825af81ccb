"""Model vs. measured: when the host has the target GPU, compile and time the real train step.

UNVERIFIED: no GPU is reachable from the machines this was written on, so this path has not run on
one. It only runs when every condition holds: JAX's default backend is a GPU, its device kind maps to
the target's catalog chip, and there are exactly as many devices as the target names. It reuses
`polychip.train.bench.bench_train` (the same jitted step `train` runs), so nothing is timed twice.
"""
from __future__ import annotations


def measure_local(r, req) -> dict | None:
    """Measured figures for the modelled target, or None (with no side effects) when the host cannot."""
    if req.mode != "train":
        return None
    try:
        import jax

        devs = jax.devices()
    except RuntimeError:
        return None
    if not devs or devs[0].platform not in ("gpu", "cuda", "rocm"):
        return None
    from polychip.hardware.catalog import chip_for_device_kind

    chip = chip_for_device_kind(devs[0].device_kind)
    if chip is None or chip.name != r.spec.chip.name or len(devs) != r.spec.n_chips:
        return None
    from polychip.compile.lower import with_mesh
    from polychip.train.bench import bench_train

    res = bench_train(with_mesh(r.cfg, r.sizes), warmup=2, steps=5, log=lambda *a, **k: None)
    return {"source": "measured", "device_kind": devs[0].device_kind, "devices": len(devs),
            "step_time_s": res["step_time_median_s"], "tokens_per_s": res["tokens_per_s"], "mfu": res["mfu"],
            "first_step_s": res["first_step_s"]}
