"""Analytic roofline for training steps and serving, per (model, chip, chip count).

Lower bounds only: each term (compute, HBM traffic, collectives) is what the hardware needs at its
published peak, and they are assumed to overlap perfectly, so the bound is their maximum. The
performance model divides by an efficiency factor that calibration fits from measured records.

Training (FSDP over `dp` chips, tensor parallel `tp` = n / dp when there are more chips than
sequences; JAX scaling book ch. 5):
- FLOPs: polychip.model.flops (6N per token plus causal attention); full remat adds a forward (8N).
- HBM bytes per chip: 3 reads of the bf16 weights it computes with (forward, two backward matmuls),
  the sharded AdamW update (read+write 10 B/param of state, read the bf16 grad), and activations
  saved in forward and read in backward: 34 * d_model bytes per token per layer (Korthikanti et al.
  2022, eq. 2 without the attention-score term that flash attention never stores).
- Collectives per chip: FSDP all-gathers the weights twice and reduce-scatters the gradients
  ((dp-1)/dp of 2 bytes per parameter each); tensor parallelism all-reduces activations four times
  per layer. Bytes go over the catalog's per-chip link bandwidth.

Serving (one replica of k chips, tensor parallel, decode batch B):
- decode step >= (weight bytes + B * KV bytes at mean context) / (k * HBM bandwidth) (the scaling
  book's decode rule), or its FLOPs at peak, whichever is larger; plus two activation all-reduces
  per layer. Prefill of one prompt is compute-bound at long prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from polychip.config import ModelConfig
from polychip.hardware import Chip
from polychip.model import flops as F

#: Bytes saved per token per layer for backward, per unit of d_model (bf16, no attention scores).
ACT_BYTES_PER_TOKEN_LAYER_PER_D = 34
#: Fraction of HBM usable for state (the runtime, compiler scratch and fragmentation take the rest).
HBM_USABLE = 0.9


def adam_state_bytes_per_param(param_dtype: str = "bfloat16") -> int:
    """Weights + two fp32 AdamW moments: 10 bytes/param for bf16 weights (scaling book), 12 for fp32."""
    return {"bfloat16": 2, "float32": 4}[param_dtype] + 8


def critical_batch(chip: Chip, dtype: str = "bfloat16") -> float:
    """Tokens per chip above which a bf16 matmul is compute-bound: peak FLOP/s / HBM bytes/s.

    (For x[B, D] @ w[D, F] in bf16: 2BDF FLOPs over ~2DF bytes of weights, so intensity ~ B.)
    """
    return chip.peak(dtype) / chip.hbm_bandwidth


@dataclass(frozen=True)
class TrainBound:
    """Roofline terms for one training step. Times in seconds, bytes per chip."""

    n_chips: int
    dp: int
    tp: int
    grad_accum: int
    remat: str
    model_flops: float  # per step, all chips (MFU numerator)
    hw_flops: float  # per step, with remat recompute
    t_compute: float
    t_memory: float
    t_comm: float
    hbm_bytes_needed: float  # per chip
    fits: bool
    comm_modelled: bool

    @property
    def t_step(self) -> float:
        return max(self.t_compute, self.t_memory, self.t_comm)

    @property
    def bound(self) -> str:
        terms = {"compute": self.t_compute, "memory": self.t_memory, "comm": self.t_comm}
        return max(terms, key=terms.get)


def split(n_chips: int, batch: int) -> tuple[int, int]:
    """(dp, tp): data/FSDP degree = min(n, batch); the rest is tensor parallel (must divide)."""
    dp = min(n_chips, batch)
    while n_chips % dp:
        dp -= 1
    return dp, n_chips // dp


def train_bound(cfg: ModelConfig, chip: Chip, n_chips: int, batch: int, seq: int, remat: str = "none",
                param_dtype: str = "bfloat16", dtype: str = "bfloat16", grad_accum: int = 1) -> TrainBound:
    """Roofline terms for one step of global batch `batch` sequences of `seq` tokens on n chips.

    With grad_accum micro-batches, activations shrink by that factor while the weights are read (and,
    under FSDP, all-gathered) once per micro-batch.
    """
    n = n_chips
    dp, tp = split(n, batch)
    A = grad_accum
    tokens = batch * seq
    model_flops = F.train_flops_per_token(cfg, seq) * tokens
    hw_flops = model_flops * (4.0 / 3.0 if remat == "full" else 1.0)
    t_compute = hw_flops / (n * chip.peak(dtype))

    P = cfg.n_params
    Pm = F.matmul_params(cfg)
    wbytes = 2  # bf16 compute copy of the weights
    tokens_local = tokens / dp / A  # per micro-batch
    act = ACT_BYTES_PER_TOKEN_LAYER_PER_D * cfg.d_model * cfg.n_layers * tokens_local / tp
    hbm_traffic = (A * 3 * wbytes * Pm / tp  # weights read by fwd + two bwd matmuls, per micro-batch
                   + (2 * adam_state_bytes_per_param(param_dtype) + wbytes) * P / n  # sharded AdamW update
                   + A * 2 * act)  # activations written in fwd, read in bwd
    t_memory = hbm_traffic / chip.hbm_bandwidth

    comm = 0.0
    if dp > 1:
        comm += (2 * A + 1) * wbytes * (P / tp) * (dp - 1) / dp  # 2 all-gathers per micro-batch + 1 reduce-scatter
    if tp > 1:
        comm += A * 4 * cfg.n_layers * tokens_local * cfg.d_model * wbytes * 2 * (tp - 1) / tp
    comm_modelled = chip.link_bandwidth is not None or comm == 0
    t_comm = comm / chip.link_bandwidth if chip.link_bandwidth else 0.0

    state = adam_state_bytes_per_param(param_dtype) * P / n + wbytes * P / n  # + sharded grads
    # "dots" saves the matmul outputs and recomputes only elementwise work: counted like "none" (no extra
    # matmul FLOPs, activations mostly kept); a conservative memory figure for it.
    saved = act if remat in ("none", "dots") else 2 * cfg.d_model * cfg.n_layers * tokens_local / tp
    gathered = 2 * wbytes * Pm / cfg.n_layers / tp  # one layer's weights gathered (double-buffered)
    need = state + saved + gathered
    fits = chip.hbm_bytes is None or need <= HBM_USABLE * chip.hbm_bytes
    return TrainBound(n, dp, tp, A, remat, model_flops, hw_flops, t_compute, t_memory, t_comm, need, fits, comm_modelled)


# ----------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------
def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int = 2) -> int:
    """2 (K and V) x bytes x kv_heads x head_dim x layers."""
    return 2 * kv_bytes * cfg.n_kv_heads * cfg.head_dim * cfg.n_layers


@dataclass(frozen=True)
class ServeBound:
    """One replica of k chips at decode batch B. Times in seconds (before efficiency)."""

    k: int
    batch: int
    t_decode: float  # one decode step for the whole batch
    t_prefill: float  # one prompt
    hbm_bytes_needed: float  # per chip
    fits: bool

    def at_efficiency(self, eff: float, output_tokens: int) -> tuple[float, float, float]:
        """(ttft_s, tpot_s, requests/s per replica) at full load with prefills interleaved.

        Per request the replica spends t_prefill on its prompt and output_tokens * t_decode / B on
        its share of decode steps, so requests/s = 1 / (t_prefill + output * t_decode / B). A token
        stream then sees a decode step plus the prefills run between steps: tpot = t_decode +
        t_prefill * B / output. TTFT = prefill + one decode step (queueing not modelled).
        """
        td, tp = self.t_decode / eff, self.t_prefill / eff
        rps = 1.0 / (tp + output_tokens * td / self.batch)
        tpot = td + tp * self.batch / output_tokens
        return tp + td, tpot, rps


def serve_bound(cfg: ModelConfig, chip: Chip, k: int, batch: int, prompt: int, output: int,
                dtype: str = "bfloat16") -> ServeBound:
    wb = 1 if dtype == "float8" else 2
    weights = cfg.n_params * wb
    kv_tok = kv_bytes_per_token(cfg)
    ctx_mean = prompt + output / 2
    peak = chip.peak(dtype) or chip.peak("bfloat16")
    t_mem = (weights + batch * kv_tok * ctx_mean) / (k * chip.hbm_bandwidth)
    t_flops = batch * F.decode_flops_per_token(cfg, int(ctx_mean)) / (k * peak)
    comm = 0.0
    if k > 1 and chip.link_bandwidth:
        comm = 2 * cfg.n_layers * batch * cfg.d_model * 2 * 2 * (k - 1) / k / chip.link_bandwidth
    t_decode = max(t_mem, t_flops, comm)
    pre_flops = prompt * F.forward_flops_per_token(cfg, prompt)
    pre_comm = 0.0
    if k > 1 and chip.link_bandwidth:
        pre_comm = 2 * cfg.n_layers * prompt * cfg.d_model * 2 * 2 * (k - 1) / k / chip.link_bandwidth
    t_prefill = max(pre_flops / (k * peak), (weights + prompt * kv_tok) / (k * chip.hbm_bandwidth), pre_comm)
    need = (weights + batch * kv_tok * (prompt + output)) / k
    fits = chip.hbm_bytes is None or need <= HBM_USABLE * chip.hbm_bytes
    return ServeBound(k, batch, t_decode, t_prefill, need, fits)


def pow2_upto(limit: int, start: int = 1) -> list[int]:
    out, v = [], max(1, start)
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def max_fit_batch(cfg: ModelConfig, chip: Chip, k: int, prompt: int, output: int, dtype: str) -> int:
    """Largest decode batch whose KV cache fits beside the weights on k chips (0: weights alone don't fit)."""
    wb = 1 if dtype == "float8" else 2
    free = HBM_USABLE * chip.hbm_bytes * k - cfg.n_params * wb
    if free <= 0:
        return 0
    return int(free // (kv_bytes_per_token(cfg) * (prompt + output)))


def log2_ceil(x: float) -> int:
    return 0 if x <= 1 else math.ceil(math.log2(x))
