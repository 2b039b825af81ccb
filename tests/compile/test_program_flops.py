"""The traced-program FLOP counter against the FLOPs formula, exactly (matmuls only, reference kernels).

With reference attention (dense T x T scores) and reference cross-entropy, every matmul of the train
step is a weight matmul or QK^T / PV, and backward does exactly two matmuls per forward one, so
program FLOPs = 3 * (2 * matmul_params + 4 * L * H * Dh * T) * B * T: the formula of
polychip.model.flops with the full context T instead of the causal mean (T + 1) / 2.
"""
import dataclasses

import jax
import pytest

from polychip.compile import program_flops
from polychip.config import build_config
from polychip.model import flops as F
from polychip.train.step import StepSpec

REF = ["kernels.attention=reference", "kernels.cross_entropy=reference", "kernels.rms_norm=reference",
       "train.layer_loop=scan"]  # a real layer loop, as in every deep model


def _count(cfg):
    spec = StepSpec.build(cfg, devices=jax.devices()[:1])
    return program_flops.count(spec.step_fn, spec.abstract_state, spec.abstract_batch)


def _dense_formula(m, B, T):
    return 3 * (2 * F.matmul_params(m) + 4 * m.n_layers * m.n_heads * m.head_dim * T) * B * T


@pytest.mark.parametrize("extra", [[], ["model.n_layers=5"], ["train.grad_accum=4"]])
def test_train_program_flops_exact(extra):
    cfg = build_config("tiny", overrides=REF + extra)
    m, t = cfg.model, cfg.train
    got = _count(cfg)
    assert got.flops == pytest.approx(_dense_formula(m, t.batch_size, t.seq_len), rel=1e-9)
    # The model formula counts causal attention ((T+1)/2 keys per query): lower by exactly the masked half.
    assert got.flops > F.train_flops_per_step(m, t.batch_size, t.seq_len)
    # Loops: layers under scan (and the micro-batch scan): counted once, the total is much smaller.
    assert got.flops_loops_once < got.flops
    assert ("scan", m.n_layers) in got.loops


def test_full_remat_recomputes_the_blocks_forward_except_w_down():
    """remat=full recomputes each block's forward in backward, except the last matmul (w_down): its
    output only feeds the residual sum, which the scan carries, so backward never needs it and JAX's
    partial evaluation drops it."""
    base = build_config("tiny", overrides=REF)
    full = build_config("tiny", overrides=REF + ["train.remat=full"])
    m, t = base.model, base.train
    tokens = t.batch_size * t.seq_len
    block_fwd = (2 * (F.matmul_params(m) - m.d_model * m.vocab_size)
                 + 4 * m.n_layers * m.n_heads * m.head_dim * t.seq_len) * tokens
    w_down = 2 * m.n_layers * m.d_ff * m.d_model * tokens
    assert _count(full).flops - _count(base).flops == pytest.approx(block_fwd - w_down, rel=1e-9)


def test_pallas_kernels_count_their_declared_cost_once_per_shard():
    """A Pallas call is opaque to the jaxpr walk except for its pl.CostEstimate: the Pallas RMSNorm declares
    4 N D FLOPs for its [N, D] block; under a 4-way shard_map over rows each shard has N = 64 of 256 rows,
    so the program does 4 x 4 x 64 x 512 = 524,288 FLOPs."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from polychip.kernels.rms_norm.pallas_tpu import rms_norm

    mesh = jax.sharding.AbstractMesh((4,), ("x",))

    def f(x, s):
        return jax.shard_map(lambda a, b: rms_norm(a, b, interpret=True), mesh=mesh, in_specs=(P("x"), P()),
                             out_specs=P("x"), check_vma=False)(x, s)

    got = program_flops.count(f, jax.ShapeDtypeStruct((256, 512), jnp.float32), jax.ShapeDtypeStruct((512,), jnp.float32))
    assert got.flops == 4 * 4 * 64 * 512
    assert got.declared_flops == got.flops
    assert got.opaque_calls == 0
