"""Remat policies (config.REMAT_POLICIES): same numbers as no remat, and the residuals each one names.

Residuals are read from jax.ad_checkpoint.print_saved_residuals (the public form of the list) on the
scanned layer loop: what the backward pass keeps per layer is stacked into [L, B, T, ...] scan
outputs, one per kept tensor; host-memory residuals print as `f32<host>[...]`.
"""
import collections
import contextlib
import io
import re

import jax
import numpy as np
import pytest

from polychip.config import REMAT_POLICIES, build_config
from polychip.kernels.registry import KernelPolicy, Target
from polychip.model import transformer as T

L, B, S = 2, 2, 16


@pytest.fixture(scope="module")
def setup():
    cfg = build_config("tiny", overrides=[f"model.n_layers={L}"])
    m = cfg.model
    params = T.init_params(m, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (B, S + 1), 0, m.vocab_size)
    policy = KernelPolicy.create(Target.of(None), {"attention": "reference"})
    # Trailing shape of each tagged tensor (tiny: D=64, H=4, K=2, Dh=16, F=192 are all distinct).
    shapes = {"layer_input": (m.d_model,), "query_proj": (m.n_heads, m.head_dim), "key_proj": (m.n_kv_heads, m.head_dim),
              "value_proj": (m.n_kv_heads, m.head_dim), "context": (m.n_heads, m.head_dim), "out_proj": (m.d_model,),
              "mlp_gate": (m.d_ff,), "mlp_up": (m.d_ff,), "mlp_out": (m.d_model,)}
    return cfg, params, batch, policy, shapes


def _loss(setup, remat):
    cfg, params, batch, policy, _ = setup
    rt = T.Runtime(policy=policy, remat=remat, unroll_layers=False)
    return lambda p: T.loss_fn(p, batch, cfg.model, rt)[0]


def _per_layer_residuals(setup, remat):
    """Counter of (memory space, trailing shape) of the residuals stacked over the layer loop."""
    _, params, _, _, _ = setup
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(_loss(setup, remat), params)
    out = collections.Counter()
    for line in buf.getvalue().splitlines():
        m = re.match(r"\w+(<host>)?\[([\d,]*)\]", line)
        shape = tuple(int(d) for d in m.group(2).split(",") if d)
        # [L, B, S, ...], or [L, B*S, N] for a matmul output saved before dense() reshapes it
        tail = shape[3:] if shape[:3] == (L, B, S) else shape[2:] if shape[:2] == (L, B * S) else None
        if tail:
            out[("host" if m.group(1) else "device", tail)] += 1
    return out


@pytest.fixture(scope="module")
def reference(setup):
    _, params, _, _, _ = setup
    return jax.jit(jax.value_and_grad(_loss(setup, "none")))(params)


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_same_loss_and_grads(setup, reference, remat):
    _, params, _, _, _ = setup
    loss, grads = jax.jit(jax.value_and_grad(_loss(setup, remat)))(params)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, reference[1])


@pytest.mark.parametrize("remat", ["full", "save_qkv_proj", "save_qkvo_proj", "save_dot_except_mlp"])
def test_selective_policies_keep_the_layer_input_and_exactly_the_named_tensors(setup, remat):
    shapes = setup[4]
    want = collections.Counter([("device", shapes["layer_input"])])
    want.update(("device", shapes[n]) for n in REMAT_POLICIES[remat].saved)
    assert _per_layer_residuals(setup, remat) == want


def test_offload_keeps_the_layer_input_on_the_host_and_nothing_per_layer_on_the_device(setup):
    assert _per_layer_residuals(setup, "offload_layer_input") == collections.Counter([("host", (setup[0].model.d_model,))])


def test_none_and_dots_keep_more_than_any_selective_policy(setup):
    shapes = setup[4]
    sel = sum(_per_layer_residuals(setup, "save_dot_except_mlp").values())
    dots, none = _per_layer_residuals(setup, "dots"), _per_layer_residuals(setup, "none")
    # dots keeps the MLP matmul outputs that save_dot_except_mlp recomputes; none keeps those and more.
    assert dots[("device", shapes["mlp_gate"])] >= 2 and sum(dots.values()) > sel
    assert sum(none.values()) > sum(dots.values())
