"""Shared by the pipeline and context-parallel tests: train steps and gradients through StepSpec."""
import jax

from polychip.model import transformer as T
from polychip.train.step import StepSpec
from tests.conftest import random_batches


def losses_and_grads(cfg, n_steps=2):
    """Losses of n_steps train steps and the first batch's gradients, all through StepSpec."""
    spec = StepSpec.build(cfg)
    rt = spec.runtime
    state = spec.init_state()
    grads = jax.jit(jax.grad(lambda p, b: T.loss_fn(p, b, cfg.model, rt)[0]),
                    in_shardings=(spec.shardings["params"], spec.batch_sharding))
    losses, g0 = [], None
    for i, local in enumerate(random_batches(cfg, n_steps)):
        batch = spec.put_batch(local)
        if i == 0:
            g0 = jax.device_get(grads(state["params"], batch))
        state, m = spec.jitted(state, batch)
        losses.append(float(m["loss"]))
    return losses, g0
