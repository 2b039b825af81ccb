"""Multi-process start-up on JAX's own multi-controller runtime (`jax.distributed`).

Coordinator address, process count and id come from flags (DistributedConfig) or, when those are
empty, from the usual cluster environment variables, read here and nowhere else:
- polychip / generic: COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID
- JAX's own:          JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
- torchrun style:     MASTER_ADDR + MASTER_PORT, WORLD_SIZE, RANK
- SLURM and Cloud TPU pods: handled by jax.distributed.initialize()'s own auto-detection when nothing
  above is set and the environment says so (SLURM_JOB_ID, TPU worker metadata).
On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`).
"""
from __future__ import annotations

import os

from polychip.config import ConfigError, DistributedConfig


def _env(*names: str) -> str:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return ""


def resolve(cfg: DistributedConfig) -> DistributedConfig:
    coord = cfg.coordinator or _env("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    if not coord and os.environ.get("MASTER_ADDR"):
        coord = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
    n = cfg.num_processes or int(_env("NUM_PROCESSES", "JAX_NUM_PROCESSES", "WORLD_SIZE") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(_env("PROCESS_ID", "JAX_PROCESS_ID", "RANK") or -1)
    return DistributedConfig(coordinator=coord, num_processes=n, process_id=pid, cpu_devices=cfg.cpu_devices)


def configure_cpu_devices(n: int) -> None:
    """Simulate `n` CPU devices in this process; must run before JAX initialises its backends."""
    if n > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def initialize(cfg: DistributedConfig) -> DistributedConfig:
    """Start jax.distributed when more than one process is asked for. Returns the resolved config."""
    r = resolve(cfg)
    configure_cpu_devices(r.cpu_devices)
    if r.num_processes > 1 or r.coordinator:
        if not r.coordinator or r.num_processes < 1 or r.process_id < 0:
            raise ConfigError(
                "multi-process run needs a coordinator address, a process count and a process id "
                f"(got coordinator={r.coordinator!r}, num_processes={r.num_processes}, process_id={r.process_id}); "
                "pass --coordinator/--num-processes/--process-id or set COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID"
            )
        if r.process_id >= r.num_processes:
            raise ConfigError(f"process id {r.process_id} is out of range for {r.num_processes} processes")
        import jax

        if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=r.coordinator, num_processes=r.num_processes,
                                   process_id=r.process_id)
    return r
