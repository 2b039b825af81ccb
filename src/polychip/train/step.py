"""The train step: the one function that `train` runs, `compile` lowers for a pod, and `plan` calibrates.

`StepSpec.build(cfg, ...)` is the one builder every caller uses (the train loop, `bench`, `compile`,
benchmarks and tests): config -> mesh + layout -> kernel policy -> runtime -> abstract state ->
shardings -> jitted step. What `compile` lowers ahead of time is therefore what `train` runs.

state = {"step": int32 scalar, "params": pytree, "opt_state": optax state}. The batch [B, T+1] is split
into grad_accum micro-batches scanned in sequence (gradients summed in float32), so peak activation
memory is that of one micro-batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polychip.config import Config, ConfigError, MeshConfig
from polychip.kernels.registry import KernelPolicy, Target
from polychip.model import transformer as T
from polychip.parallel.mesh import dcn_shape, make_mesh
from polychip.parallel.sharding import Layout
from polychip.train.optim import make_optimizer, opt_state_axes, schedule


@dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything static that defines a train step, and the artefacts derived from it (each built once).

    Build it with `StepSpec.build`; then `init_state()`, `jit()` (the donated, sharded step),
    `abstract_state` / `shardings` / `abstract_batch` (for ahead-of-time lowering), `put_batch`."""

    cfg: Config
    layout: Layout
    runtime: T.Runtime

    @staticmethod
    def build(cfg: Config, *, devices: Sequence | None = None, target: Target | None = None,
              check: bool = True) -> "StepSpec":
        """devices: the mesh's devices (default all of this process's view, `jax.devices()`; a TPU
        topology's devices for a deviceless compile). target: where the kernels will run (default: the
        first device's platform and kind). check: refuse shapes the mesh cannot split (ConfigError)."""
        devices = list(devices) if devices is not None else None
        mesh = make_mesh(cfg.mesh, devices)
        layout = Layout.create(mesh, layout_rules(cfg.mesh, dict(mesh.shape)))
        target = target or Target.of(devices[0] if devices else None)
        policy = KernelPolicy.create(target, cfg.kernels.overrides())
        spec = StepSpec(cfg, layout, make_runtime(cfg, policy, layout))
        if check:
            spec.check_shapes()
        return spec

    # -- static facts ------------------------------------------------------------------------------
    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg.train)

    @functools.cached_property
    def abstract_state(self) -> dict:
        """ShapeDtypeStructs of the whole train state, without allocating."""
        params = T.abstract_params(self.cfg.model, T.DTYPES[self.cfg.train.param_dtype])
        return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                "opt_state": jax.eval_shape(self.optimizer.init, params)}

    @functools.cached_property
    def state_axes(self) -> dict:
        p_axes = T.param_axes(self.cfg.model)
        return {"step": (), "params": p_axes, "opt_state": opt_state_axes(self.abstract_state["opt_state"], p_axes)}

    @functools.cached_property
    def shardings(self) -> dict:
        return self.layout.tree_shardings(self.state_axes, self.abstract_state)

    @property
    def batch_sharding(self) -> Any:
        # By shape: the T+1 tokens of a row do not split over `context` (the activations do, inside).
        t = self.cfg.train
        return self.layout.sharding(("batch", "seq"), (t.batch_size, t.seq_len + 1))

    @property
    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        t = self.cfg.train
        return jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=self.batch_sharding)

    def sharded_abstract_state(self) -> dict:
        """abstract_state with each leaf's target sharding (what a checkpoint restores onto)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.shardings)

    def dropped(self) -> list:
        """Sharding rules that could not apply to some parameter (mesh axis does not divide it), led by the
        KV-head replication when the tensor axis has more ways than the model has KV heads."""
        out = self.layout.dropped(self.state_axes["params"], self.abstract_state["params"])
        tp, K = self.layout.mesh.shape["tensor"], self.cfg.model.n_kv_heads
        if tp > K and tp % K == 0:
            out.insert(0, f"KV-head replication: model.n_kv_heads={K} on mesh.tensor={tp}, each KV head's wk/wv "
                          f"and keys/values on {tp // K} tensor devices")
        return out

    def check_shapes(self) -> None:
        """Refuse (ConfigError, one line) a batch or head count the mesh cannot split."""
        t, mesh = self.cfg.train, self.layout.mesh
        check_accum(t.batch_size, t.grad_accum, self.layout.batch_divisor,
                    f"mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}")
        if t.batch_size % jax.process_count():
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes")
        check_tensor(self.cfg.model, mesh.shape["tensor"])

    # -- artefacts ---------------------------------------------------------------------------------
    @property
    def step_fn(self) -> Callable:
        """(state, batch) -> (state, metrics), pure (not jitted)."""
        return train_step_fn(self.cfg, self.runtime, self.optimizer)

    @functools.cached_property
    def jitted(self):
        """The jitted step with donated state and explicit in/out shardings (what train runs and compile
        lowers)."""
        return jax.jit(self.step_fn, in_shardings=(self.shardings, self.batch_sharding),
                       out_shardings=(self.shardings, None), donate_argnums=(0,))

    @functools.cached_property
    def jitted_eval(self):
        """(params, batch) -> mean loss, jitted."""
        cfg, rt = self.cfg, self.runtime
        return jax.jit(lambda params, batch: T.loss_and_metrics(params, batch, cfg.model, rt)[1]["loss"])

    def init_state(self) -> dict:
        """Initialise params + optimiser state directly into their shardings (no full copy on one device)."""
        cfg, opt = self.cfg, self.optimizer

        def init():
            params = T.init_params(cfg.model, jax.random.key(cfg.train.seed), T.DTYPES[cfg.train.param_dtype])
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}

        return jax.jit(init, out_shardings=self.shardings)()

    def put_batch(self, local: np.ndarray) -> jax.Array:
        """This process's rows -> one global batch laid out for the step (multi-process aware)."""
        if jax.process_count() == 1:
            return jax.device_put(local, self.batch_sharding)
        return jax.make_array_from_process_local_data(self.batch_sharding, local)


def layout_rules(mesh: MeshConfig, sizes: dict[str, int]) -> dict:
    """mesh.rules, plus what a multi-slice mesh needs unless the user said otherwise: when the batch is split
    across slices (a DCN axis other than `stage` spans more than one), the embedding table gathered for the
    lookup, so that only gradient reductions cross slices (model.transformer.hidden_states). Slices joined
    by pipeline stages only keep the sharded lookup, whose backward all-to-all stays inside a slice: for
    llama3-405b over 2 v6e slices, gathering the 4 GB table and its gradient cost 6.7 GB of HBM per chip.
    `sizes`: the mesh's axis sizes."""
    if mesh.slices <= 1:
        return dict(mesh.rules)
    span = dcn_shape(mesh, sizes)
    if all(span[a] == 1 for a in mesh.dcn_axes if a != "stage"):
        return dict(mesh.rules)
    return {"embed_lookup": None, **mesh.rules}


def check_accum(batch: int, accum: int, replicas: int, what: str) -> None:
    """grad_accum may be any divisor of the per-replica batch (batch / replicas); ConfigError otherwise."""
    if batch % replicas:
        raise ConfigError(f"train.batch_size={batch} is not divisible by the data-parallel ways {replicas} ({what})")
    per = batch // replicas
    if per % accum:
        ok = [d for d in range(1, per + 1) if per % d == 0]
        raise ConfigError(f"train.grad_accum={accum} does not divide the per-replica batch {per} (train.batch_size="
                          f"{batch} over {replicas} data-parallel ways, {what}); valid: {', '.join(map(str, ok))}")


def check_tensor(m, tp: int) -> None:
    """The tensor axis splits attention by heads: it must divide n_heads, and n_kv_heads unless each KV
    head is replicated over tp / n_kv_heads devices (tp a multiple of n_kv_heads: GQA/MQA with more
    tensor ways than KV heads; wk/wv then replicate, listed in StepSpec.dropped())."""
    if tp <= 1:
        return
    if m.n_heads % tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tp}")
    if m.n_kv_heads % tp and tp % m.n_kv_heads:
        raise ConfigError(f"mesh.tensor={tp} neither divides model.n_kv_heads={m.n_kv_heads} nor is a multiple of it "
                          f"(KV-head replication needs tensor = k x n_kv_heads)")


def make_runtime(cfg: Config, policy: KernelPolicy, layout: Layout | None) -> T.Runtime:
    """The kernel policy learns the layout too: kernels XLA cannot partition then run per shard."""
    unroll = {"auto": None, "scan": False, "unroll": True}[cfg.train.layer_loop]
    return T.Runtime(policy=policy.with_layout(layout), layout=layout, compute_dtype=cfg.train.compute_dtype,
                     remat=cfg.train.remat, unroll_layers=unroll,
                     pipeline_microbatches=cfg.train.pipeline_microbatches, pipeline_repeats=cfg.train.pipeline_repeats)


def train_step_fn(cfg: Config, rt: T.Runtime, opt: optax.GradientTransformation) -> Callable:
    """(state, batch) -> (state, metrics). Pure; `StepSpec.jitted` jits it with donated state."""
    sched = schedule(cfg.train)
    A = cfg.train.grad_accum
    # Gradients of the objective (cross-entropy + MoE auxiliary losses); metrics report the parts.
    grad_fn = jax.value_and_grad(lambda params, mb: T.loss_and_metrics(params, mb, cfg.model, rt), has_aux=True)

    def grads_and_loss(params, batch):
        if A == 1:
            (_, m), grads = grad_fn(params, batch)
            return grads, {k: v for k, v in m.items() if k != "tokens"}
        B = batch.shape[0]
        # Micro-batch i takes rows i, i + A, i + 2A, ...: every device's contiguous block of rows splits
        # into A local pieces, so no micro-batch moves rows between devices (a contiguous split would put
        # micro-batch 0 on the first devices only and reshuffle the whole batch).
        mbs = batch.reshape(B // A, A, batch.shape[1]).swapaxes(0, 1)
        if rt.layout is not None:
            mbs = rt.layout.constrain(mbs, (None, "batch", "seq"))
        zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def acc(carry, mb):
            g_sum, m_sum = carry
            (_, m), g = grad_fn(params, mb)
            m_sum = jax.tree.map(lambda a, b: a + b, m_sum, {k: v for k, v in m.items() if k != "tokens"})
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g), m_sum), None

        m_zero = {k: jnp.zeros((), jnp.float32) for k in metric_names}
        (g_sum, m_sum), _ = jax.lax.scan(acc, (zero, m_zero), mbs)
        return jax.tree.map(lambda g, p: (g / A).astype(p.dtype), g_sum, params), {k: v / A for k, v in m_sum.items()}

    metric_names = ("loss",) + (("moe_lb_loss", "moe_z_loss", "moe_aux_loss") if cfg.model.n_experts else ())

    def step(state, batch):
        params = state["params"]
        grads, loss_metrics = grads_and_loss(params, batch)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = opt.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {**loss_metrics, "grad_norm": gnorm, "lr": sched(state["step"])}
        return {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt}, metrics

    return step
