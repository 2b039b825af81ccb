"""The train step: the one function that `train` runs, `compile` lowers for a pod, and `plan` calibrates.

state = {"step": int32 scalar, "params": pytree, "opt_state": optax state}. The batch [B, T+1] is split
into grad_accum micro-batches scanned in sequence (gradients summed in float32), so peak activation
memory is that of one micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from polychip.config import Config
from polychip.kernels.registry import KernelPolicy
from polychip.model import transformer as T
from polychip.parallel.sharding import Layout
from polychip.train.optim import make_optimizer, opt_state_axes, schedule


@dataclass(frozen=True)
class StepSpec:
    """Everything (static) that defines a compiled train step."""

    cfg: Config
    runtime: T.Runtime

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg.train)


def make_runtime(cfg: Config, policy: KernelPolicy, layout: Layout | None) -> T.Runtime:
    """The kernel policy learns the layout too: kernels XLA cannot partition then run per shard."""
    unroll = {"auto": None, "scan": False, "unroll": True}[cfg.train.layer_loop]
    return T.Runtime(policy=policy.with_layout(layout), layout=layout, compute_dtype=cfg.train.compute_dtype,
                     remat=cfg.train.remat, unroll_layers=unroll)


def train_step_fn(cfg: Config, rt: T.Runtime) -> Callable:
    """(state, batch) -> (state, metrics). Pure; jit it with donated state."""
    opt = make_optimizer(cfg.train)
    sched = schedule(cfg.train)
    A = cfg.train.grad_accum
    mcfg = cfg.model

    def loss(params, mb):
        return T.loss_fn(params, mb, mcfg, rt)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step(state, batch):
        params = state["params"]
        B = batch.shape[0]
        if A == 1:
            (l, _), grads = grad_fn(params, batch)
        else:
            mbs = batch.reshape(A, B // A, batch.shape[1])
            if rt.layout is not None:
                mbs = rt.layout.constrain(mbs, (None, "batch", "seq"))
            zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

            def acc(carry, mb):
                g_sum, l_sum = carry
                (l, _), g = grad_fn(params, mb)
                return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g), l_sum + l), None

            (g_sum, l_sum), _ = jax.lax.scan(acc, (zero, jnp.zeros((), jnp.float32)), mbs)
            grads = jax.tree.map(lambda g, p: (g / A).astype(p.dtype), g_sum, params)
            l = l_sum / A
        gnorm = optax.tree.norm(grads)
        updates, new_opt = opt.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": l, "grad_norm": gnorm, "lr": sched(state["step"])}
        return {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt}, metrics

    return step


def eval_step_fn(cfg: Config, rt: T.Runtime) -> Callable:
    def ev(params, batch):
        return T.loss_fn(params, batch, cfg.model, rt)[0]

    return ev


def state_axes(cfg: Config, abstract_state: dict) -> dict:
    p_axes = T.param_axes(cfg.model)
    return {"step": (), "params": p_axes, "opt_state": opt_state_axes(abstract_state["opt_state"], p_axes)}


def abstract_state(cfg: Config) -> dict:
    """ShapeDtypeStructs of the whole train state, without allocating."""
    dtype = T.DTYPES[cfg.train.param_dtype]
    params = T.abstract_params(cfg.model, dtype)
    opt = make_optimizer(cfg.train)
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": jax.eval_shape(opt.init, params)}


def state_shardings(cfg: Config, layout: Layout, abstract: dict | None = None) -> dict:
    abstract = abstract or abstract_state(cfg)
    axes = state_axes(cfg, abstract)
    return layout.tree_shardings(axes, abstract)


def init_state(cfg: Config, layout: Layout) -> dict:
    """Initialise params + optimiser state directly into their shardings (no full copy on one device)."""
    dtype = T.DTYPES[cfg.train.param_dtype]
    opt = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, layout)

    def init():
        params = T.init_params(cfg.model, jax.random.key(cfg.train.seed), dtype)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}

    return jax.jit(init, out_shardings=shardings)()


def batch_sharding(layout: Layout) -> Any:
    return layout.sharding(("batch", "seq"))


def jit_train_step(cfg: Config, rt: T.Runtime, shardings: dict):
    """The jitted step with donated state and explicit in/out shardings."""
    fn = train_step_fn(cfg, rt)
    bs = batch_sharding(rt.layout)
    return jax.jit(fn, in_shardings=(shardings, bs), out_shardings=(shardings, None), donate_argnums=(0,))
