"""Which parallel configuration a training run uses on n chips, priced by the shared estimator.

The space matches what published runs do: every remat policy in config.REMAT_POLICIES, gradient
accumulation with any divisor of the per-replica batch (MaxText's v6e 70B recipe runs 5 sequences per
chip), tensor degrees that divide the query heads and divide (or are a multiple of: KV heads replicated)
the KV heads, pipeline stages that divide the layers, and the node / slice boundary the scale-out link
crosses. Every candidate is an analytic op list (polychip.estimate.analytic) costed by
polychip.estimate.estimate_step; the fastest that fits in HBM wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from polychip.config import REMAT_POLICIES, ModelConfig
from polychip.estimate import Calibration, StepEstimate, estimate_step
from polychip.estimate import analytic as A
from polychip.hardware import Chip

#: Largest single TPU slice in chips (one ICI domain); beyond it slices talk over DCN. Source: Google Cloud
#: TPU documentation pages (v5e and v6e: 256-chip slices; v5p: 8960-chip pods; v4: 4096; tpu7x: 9216).
SLICE_MAX = {"tpu-v4": 4096, "tpu-v5e": 256, "tpu-v6e": 256, "tpu-v5p": 8960, "tpu7x": 9216}
#: Remat policies from the least to the most recompute (the search tries all of them).
REMAT_ORDER = ("none", "dots", "save_dot_except_mlp", "save_qkvo_proj", "save_qkv_proj", "offload_layer_input", "full")
assert set(REMAT_ORDER) == set(REMAT_POLICIES), "REMAT_ORDER must list every config.REMAT_POLICIES name"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def nodes_for(chip: Chip, n_chips: int) -> int:
    """Scale-out groups n chips span: TPU slices beyond the largest slice, else hosts (GPU, Trainium)."""
    per = SLICE_MAX.get(chip.name) if chip.family == "tpu" else chip.chips_per_host
    if not per or n_chips <= per:
        return 1
    return -(-n_chips // per)


def tensor_degrees(cfg: ModelConfig, n_devices: int, max_tensor: int) -> list[int]:
    """Tensor degrees dividing the device count that the heads allow (see analytic.kv_heads_per_device)."""
    out = []
    for t in divisors(n_devices):
        if t > max_tensor:
            break
        try:
            A.kv_heads_per_device(cfg, t)
        except A.LayoutError:
            continue
        out.append(t)
    return out


def layouts(cfg: ModelConfig, chip: Chip, n_chips: int, batch: int, max_tensor: int = 8,
            max_stage: int = 16) -> list[A.Layout]:
    """Candidate layouts: tensor x stage x (fsdp, or fsdp within a node and data across nodes)."""
    dev = n_chips * chip.devices_per_chip
    nodes = nodes_for(chip, n_chips)
    out = []
    for t in tensor_degrees(cfg, dev, max_tensor):
        for p in divisors(dev // t):
            if p > max_stage or cfg.n_layers % p or (p > 1 and dev // (t * p) < 1):
                continue
            rest = dev // (t * p)
            cands = [A.Layout(fsdp=rest, tensor=t, stage=p, nodes=nodes)]
            if nodes > 1 and rest % nodes == 0 and rest > nodes:
                cands.append(A.Layout(data=nodes, fsdp=rest // nodes, tensor=t, stage=p, nodes=nodes))
            out += [lay for lay in cands if batch % lay.replicas == 0]
    return out


@dataclass(frozen=True)
class TrainChoice:
    """One priced configuration."""

    layout: A.Layout
    remat: str
    grad_accum: int
    est: StepEstimate
    hbm_bytes: float
    fits: bool


def price(cfg: ModelConfig, chip: Chip, lay: A.Layout, batch: int, seq: int, remat, grad_accum: int,
          cal: Calibration, param_dtype: str = "float32", dtype: str = "bfloat16") -> TrainChoice:
    """Estimate and memory of one configuration (raises analytic.LayoutError if it cannot run)."""
    ops = A.train_ops(cfg, lay, batch, seq, remat, grad_accum, dtype=dtype, param_dtype=param_dtype, chip=chip)
    est = estimate_step(ops, A.machine(chip), cal)
    need = A.train_memory(cfg, lay, batch, seq, remat, grad_accum, param_dtype=param_dtype)
    room = A.usable_hbm(chip)
    fits = room is None or need <= room
    name = remat if isinstance(remat, str) else "custom"
    return TrainChoice(lay, name, grad_accum, est, need, fits)


def _accums(per_replica: int, stage: int) -> list[int]:
    """Micro-batch counts to try: every divisor (pipelines need at least `stage` to fill)."""
    return [a for a in divisors(per_replica) if stage == 1 or a >= stage] or [per_replica]


def best(cfg: ModelConfig, chip: Chip, n_chips: int, batch: int, seq: int, remats: tuple[str, ...],
         cal: Calibration, max_tensor: int = 8, param_dtype: str = "float32",
         dtype: str = "bfloat16") -> TrainChoice | None:
    """The fastest fitting configuration, or None when nothing fits."""
    return _best(cfg, chip, n_chips, batch, seq, tuple(remats), cal, max_tensor, param_dtype, dtype)


def best_in_layout(cfg: ModelConfig, chip: Chip, lay: A.Layout, batch: int, seq: int, remats: tuple[str, ...],
                   cal: Calibration, grad_accum: int | None = None, param_dtype: str = "float32",
                   dtype: str = "bfloat16") -> TrainChoice:
    """The fastest configuration in one given layout: over `remats` and the micro-batch counts (`grad_accum`
    when given). The fastest that fits in HBM, else the fastest of all (its `fits` is False: a layout the user
    says was run is priced even where the memory model disagrees). Raises analytic.LayoutError when the layout
    cannot run the model (degrees that do not divide heads, layers, batch or sequence)."""
    if batch % lay.replicas:
        raise A.LayoutError(f"batch {batch} does not split into {lay.replicas} replicas")
    accums = [grad_accum] if grad_accum else _accums(batch // lay.replicas, lay.stage)
    top = None
    for remat in remats:
        for a in accums:
            c = price(cfg, chip, lay, batch, seq, remat, a, cal, param_dtype, dtype)
            if top is None or (c.fits, -c.est.t_step) > (top.fits, -top.est.t_step):
                top = c
    return top


@lru_cache(maxsize=4096)
def _best(cfg, chip, n_chips, batch, seq, remats, cal, max_tensor, param_dtype, dtype="bfloat16"):
    top = None
    for lay in layouts(cfg, chip, n_chips, batch, max_tensor):
        if seq % lay.context:
            continue
        for remat in remats:
            for a in _accums(batch // lay.replicas, lay.stage):
                try:
                    c = price(cfg, chip, lay, batch, seq, remat, a, cal, param_dtype, dtype)
                except A.LayoutError:
                    continue
                if not c.fits:
                    continue
                if top is None or c.est.t_step < top.est.t_step * (1 - 1e-9):
                    top = c
                if lay.stage == 1:
                    break  # without a pipeline, more micro-batches only add weight traffic
    return top
