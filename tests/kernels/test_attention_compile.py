"""The Pallas attention kernels lower for real hardware without one: Mosaic compiles them for a TPU
v5e with libtpu's deviceless compiler (forward + backward), and the GPU kernels lower to Triton IR
for CUDA (Triton -> PTX compilation and execution need a GPU and are not covered here)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from polychip.kernels.attention import pallas_gpu, pallas_tpu

# Several processes on one host may hold libtpu (deviceless compiles); its lockfile would refuse us.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _fwd_bwd(fn, **opts):
    f = lambda q, k, v: fn(q, k, v, **opts)  # noqa: E731
    loss = lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    return f, jax.grad(loss, argnums=(0, 1, 2))


def test_tpu_kernels_compile_for_v5e():
    topologies = pytest.importorskip("jax.experimental.topologies")
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding

    dev = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
    s = SingleDeviceSharding(dev)
    # 300 is not a multiple of the 128 blocks; GQA 4:2, window and soft-cap exercise every branch.
    q = jax.ShapeDtypeStruct((1, 300, 4, 128), jnp.bfloat16, sharding=s)
    kv = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16, sharding=s)
    fwd, bwd = _fwd_bwd(pallas_tpu.flash_attention, sliding_window=200, soft_cap=30.0, device_kind=dev.device_kind)
    for fn in (fwd, bwd):
        compiled = jax.jit(fn).lower(q, kv, kv).compile()
        text = compiled.as_text()
        assert "tpu_custom_call" in text  # the Mosaic kernels, not an XLA fallback
        assert compiled.cost_analysis()["flops"] > 0
    assert text.count("tpu_custom_call") >= 3  # grad program: forward + dQ + dK/dV kernels


def test_gpu_kernels_lower_to_triton():
    q = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
    fwd, bwd = _fwd_bwd(pallas_gpu.flash_attention, sliding_window=100, soft_cap=20.0)
    counts = []
    for fn in (fwd, bwd):
        text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
        counts.append(text.count("__gpu$xla.gpu.triton"))
    assert counts == [1, 3]
