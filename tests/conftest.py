"""Test-wide set-up: CPU only, 8 simulated devices (meshes are tested for real), quiet libtpu."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained for 10 steps on a slice of the built-in corpus (shared by read-only tests)."""
    from polychip.config import build_config
    from polychip.train.loop import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = build_config("tiny", overrides=[f"out_dir={out}", "data.max_bytes=300000", "train.steps=10",
                                          "mesh.num_devices=1"])
    train(cfg, log=lambda *a: None)
    return out


def run_train_steps(cfg, batches, devices=None, target=None):
    """Train `cfg` on `batches` (each [B, T+1] int32, host or device) through the one step builder.
    Returns (losses, spec, final state, last batch as laid out for the step)."""
    from polychip.train.step import StepSpec

    spec = StepSpec.build(cfg, devices=devices, target=target)
    state, losses, b = spec.init_state(), [], None
    for batch in batches:
        b = spec.put_batch(batch)
        state, m = spec.jitted(state, b)
        losses.append(float(m["loss"]))
    return losses, spec, state, b


def steps_and_grads(cfg, n_steps=3, metrics=("loss",)):
    """Train n_steps random batches through the one step builder, and take the first batch's gradients
    (the oracle the mesh / pipeline / context / expert equality tests compare). Returns (per-step metrics:
    a float per step for one name, else a tuple in `metrics` order; first gradients on the host; final
    state; the StepSpec)."""
    import jax

    from polychip.model import transformer as T
    from polychip.train.step import StepSpec

    spec = StepSpec.build(cfg)
    state = spec.init_state()
    grads = jax.jit(jax.grad(lambda p, b: T.loss_fn(p, b, cfg.model, spec.runtime)[0]),
                    in_shardings=(spec.shardings["params"], spec.batch_sharding))
    out, g0 = [], None
    for i, local in enumerate(random_batches(cfg, n_steps)):
        batch = spec.put_batch(local)
        if i == 0:
            g0 = jax.device_get(grads(state["params"], batch))
        state, m = spec.jitted(state, batch)
        vals = tuple(float(m[k]) for k in metrics)
        out.append(vals[0] if len(vals) == 1 else vals)
    return out, g0, state, spec


def random_batches(cfg, n, seed=0):
    """n random token batches [B, T+1] for cfg (numpy, reproducible from seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = cfg.train
    return [rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32) for _ in range(n)]


@pytest.fixture(scope="session")
def train_steps():
    """The step-running helper for tests (fixtures share it; `run_train_steps` documents it)."""
    return run_train_steps


@pytest.fixture(scope="session")
def batches():
    return random_batches
