"""The planner's front end to the estimator: a training step as an analytic list of `Op`s.

Where `compile` walks a compiled HLO module, this builds the same records from the model config and a
parallel `Layout` (plain degrees; no jax Mesh is built), so `estimate_step` prices both the same way.

Per device, per micro-batch, per layer (T tokens on the device, tensor degree t, causal attention):
- matmuls q/k/v/o and MLP gate/up/down: 2 x T x in x out / t FLOPs, HBM bytes = input + weight + output;
  the backward pass does the two matmuls dX and dW (2x the FLOPs and the bytes); FLOPs are the matrix
  unit's work, each width rounded up to its tile (MATRIX_TILE), so the per-device shard's shape sets its
  efficiency;
- attention (flash: scores never reach HBM): 4 x T x context x head_dim x heads / t FLOPs with the causal
  mean context (seq + 1) / 2, bytes = q, k, v, o; its backward re-forms the scores (2.5x the forward);
- norms, rotary, SwiGLU and residual adds: memory-bound elementwise ops (bytes only);
- remat: the forward ops whose outputs the policy (config.REMAT_POLICIES) neither saves nor offloads are
  run again in the backward pass; offloaded tensors cross the host link (PCIe) out and back;
- collectives from the layout (tensor-parallel ones blocking: the next matmul waits on them; the rest
  asynchronous, hidden under compute by the overlap rule): FSDP all-gathers each layer's weights in the forward and again in the
  backward and reduce-scatters its gradients; tensor parallelism all-reduces activations twice per layer
  forward and twice backward (plus once per recomputed half-layer); the data axis all-reduces the gradient
  shard once per step; pipeline stages send activations forward and gradients back per micro-batch, and
  the schedule's bubble ((stages - 1) / (micro-batches x virtual stages) of the stage's work) is idle time;
  context parallelism gathers K and V. Each collective is costed over INTRA (ICI / NVLink / NeuronLink)
  when its group sits inside one node or slice, else INTER (DCN / InfiniBand / EFA) for the share that
  crosses (hierarchical: bytes / members-per-node go across).
Once per step: the embedding gather, the logits matmul and its cross-entropy (fp32 logits), and the AdamW
update over the device's parameter shard.

`count` on each op is its executions per step (layers on the device x micro-batches). Everything here is a
model: no figure is measured, and results carry the calibration's band (plan/perf.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from polychip.config import REMAT_POLICIES, REMAT_TENSORS, ModelConfig, RematPolicy
from polychip.estimate.ops import HOST, INTER, INTRA, Machine, Op, machine_for

#: Bytes per activation / weight element in the compute dtype (bf16).
ACT_BYTES = 2
#: Host link (PCIe) per chip, bytes/s one direction, for offloaded activations, by chip family. GPU: PCIe Gen5 x16,
#: 64 GB/s per direction (PCI-SIG Gen5 rate; H100 SXM, H200, B200 hosts). TPU: 15 GB/s, the JAX scaling
#: book's (part 2) v6e host-to-chip PCIe figure 1.5e10 B/s (uncertain: Google publishes no per-chip host
#: bandwidth; taken for every TPU). Trainium / Inferentia: PCIe Gen5 x16 assumed (uncertain).
HOST_LINK = {"gpu": 64e9, "tpu": 15e9, "trainium": 64e9, "inferentia": 64e9}
#: Edge of the matrix unit's tile, elements: a matmul's contraction and output widths are worked in whole
#: tiles, so a width w costs ceil(w / tile) x tile / w of its FLOPs (a systolic array of 256 x 256 fed
#: a contraction of 128 idles half its rows). TPU v4 / v5e / v5p: 128 x 128 MXUs; v6e and TPU7x: 256 x 256
#: (JAX scaling book part 2; Google's Trillium announcement: larger MXUs). Trainium / Inferentia: 128 x 128
#: systolic array per NeuronCore (Neuron architecture pages). NVIDIA Hopper / Blackwell tensor cores
#: take k in steps of 16 and n in steps of 8: padding is negligible at transformer widths (16).
MATRIX_TILE = {"tpu-v6e": 256, "tpu7x": 256}
MATRIX_TILE_FAMILY = {"tpu": 128, "trainium": 128, "inferentia": 128, "gpu": 16}
#: Fraction of HBM usable for state (runtime, compiler scratch and fragmentation take the rest) where the
#: compiler's own limit is not known.
HBM_USABLE = 0.9
#: XLA:TPU's HBM limit per device, bytes, as its out-of-memory errors print it ("Used 33.07G of 31.25G
#: hbm"; G = GiB): v6e 31.25 GiB, v5e 15.75 GiB, v5p 95.74 GiB. The catalog's v6e "32 GB" and v5e "16 GB"
#: are binary 32 / 16 GiB parts, so 0.9 x the decimal figure left ~4.8 GB of a v6e unused and refused
#: MaxText's own llama2-70b v6e-256 recipe (full remat, 4 sequences of 4096 per chip).
XLA_TPU_HBM_LIMIT = {"tpu-v6e": 31.25 * 2**30, "tpu-v5e": 15.75 * 2**30, "tpu-v5p": 95.74 * 2**30}


class LayoutError(ValueError):
    """A layout the model cannot run (a degree that does not divide heads, layers or the batch)."""


@dataclass(frozen=True)
class Layout:
    """Parallel degrees of one run. Devices = data x fsdp x tensor x stage x context.

    `nodes`: scale-out groups the devices are split across (TPU slices, GPU or Trainium hosts); axes are
    laid out innermost-first tensor, context, fsdp, stage, data, so the outer axes cross nodes first.
    `virtual`: interleaved pipeline chunks per stage. `zero1`: optimizer state and fp32 master weights
    also sharded over `data` (Megatron distributed optimizer, NxD ZeRO-1).
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    stage: int = 1
    context: int = 1
    nodes: int = 1
    virtual: int = 1
    zero1: bool = False

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.stage * self.context

    @property
    def replicas(self) -> int:
        """Ways the batch is split (data x fsdp)."""
        return self.data * self.fsdp

    def text(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("data", "fsdp", "tensor", "stage", "context", "nodes")
                 if getattr(self, k) > 1]
        return " ".join(parts) or "1 device"

    def group(self, axis: str) -> tuple[int, int]:
        """(members per node g, nodes spanned k) of one collective group along `axis` (g x k = degree)."""
        order = ("tensor", "context", "fsdp", "stage", "data")
        a = getattr(self, axis)
        stride = math.prod(getattr(self, x) for x in order[:order.index(axis)])
        per_node = max(1, self.devices // max(1, self.nodes))
        if stride * a <= per_node:
            return a, 1
        g = max(1, min(a, per_node // stride))
        return g, max(1, a // g)


def kv_heads_per_device(cfg: ModelConfig, tensor: int) -> float:
    """KV heads each tensor shard holds: n_kv / t when t divides them, 1 (replicated) when t is a multiple
    of n_kv; any other degree is refused."""
    k = cfg.n_kv_heads
    if cfg.n_heads % tensor:
        raise LayoutError(f"tensor degree {tensor} does not divide {cfg.n_heads} query heads")
    if k % tensor == 0:
        return k / tensor
    if tensor % k == 0:
        return 1.0
    raise LayoutError(f"tensor degree {tensor} neither divides nor is a multiple of {k} KV heads")


def check_layout(cfg: ModelConfig, lay: Layout, batch: int, seq: int, grad_accum: int) -> None:
    """Raise LayoutError when the layout cannot run this model and batch."""
    kv_heads_per_device(cfg, lay.tensor)
    if lay.stage * lay.virtual > cfg.n_layers:
        raise LayoutError(f"{lay.stage} stages x {lay.virtual} virtual exceed {cfg.n_layers} layers")
    if batch % (lay.replicas * grad_accum):
        raise LayoutError(f"batch {batch} does not split into {lay.replicas} replicas x {grad_accum} micro-batches")
    if seq % lay.context:
        raise LayoutError(f"context degree {lay.context} does not divide sequence {seq}")
    if lay.devices % max(1, lay.nodes):
        raise LayoutError(f"{lay.devices} devices do not split evenly over {lay.nodes} nodes")


def resolve_remat(remat: str | RematPolicy) -> RematPolicy:
    if isinstance(remat, RematPolicy):
        return remat
    if remat not in REMAT_POLICIES:
        raise LayoutError(f"unknown remat policy {remat!r}; one of {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[remat]


def _kept(pol: RematPolicy) -> set:
    return set(REMAT_TENSORS) if "*" in pol.saved else set(pol.saved) | set(pol.offloaded)


@dataclass(frozen=True)
class _Dims:
    """Per-device sizes of one micro-batch on one layer."""

    T: float  # tokens on the device (micro-batch x seq / context)
    d: int
    q: float  # query width per device (heads x head_dim / t)
    kv: float  # key (= value) width per device
    f: float  # MLP width per device
    ctx: float  # mean keys a query attends to (causal)
    t: int
    hd: int = 128  # head_dim
    tile: int = 1  # the matrix unit's tile edge (matrix_tile)

    @classmethod
    def of(cls, cfg: ModelConfig, lay: Layout, micro: float, seq: int, tile: int = 1) -> "_Dims":
        t = lay.tensor
        return cls(T=micro * seq / lay.context, d=cfg.d_model, q=cfg.n_heads * cfg.head_dim / t,
                   kv=kv_heads_per_device(cfg, t) * cfg.head_dim, f=cfg.d_ff / t, ctx=(seq + 1) / 2, t=t,
                   hd=cfg.head_dim, tile=tile)

    def pad(self, *widths: float) -> float:
        """Work the matrix unit does per useful FLOP: each width rounded up to a whole tile."""
        return math.prod(self.tile * math.ceil(w / self.tile) / w for w in widths)


def _matmuls(x: _Dims) -> dict:
    """name -> (input width, output width, weight elements on the device, output tensor name)."""
    return {
        "q_proj": (x.d, x.q, x.d * x.q, "query_proj"), "k_proj": (x.d, x.kv, x.d * x.kv, "key_proj"),
        "v_proj": (x.d, x.kv, x.d * x.kv, "value_proj"), "o_proj": (x.q, x.d, x.q * x.d, "out_proj"),
        "mlp_gate": (x.d, x.f, x.d * x.f, "mlp_gate"), "mlp_up": (x.d, x.f, x.d * x.f, "mlp_up"),
        "mlp_down": (x.f, x.d, x.f * x.d, "mlp_out"),
    }


def _layer_forward(x: _Dims) -> list[tuple[str, float, float, str]]:
    """(name, flops, bytes, tagged output) of one layer's forward on one micro-batch."""
    B, T = ACT_BYTES, x.T
    out = []
    for name, (i, o, w, tag) in _matmuls(x).items():
        out.append((name, 2 * T * i * o * x.pad(i, o), B * (T * i + w + T * o), tag))
    # Q K^T contracts over head_dim and P V produces head_dim columns: both run at head_dim / tile.
    out.append(("attention", 4 * T * x.ctx * x.q * x.pad(x.hd), B * T * (2 * x.q + 2 * x.kv), "context"))
    # Elementwise (memory-bound): 2 RMSNorms (sequence-sharded), rotary on q/k, SwiGLU, 2 residual adds.
    d_sh = x.d / x.t
    out.append(("norms", 0.0, B * T * 4 * d_sh, "norm"))
    out.append(("rotary", 0.0, B * T * 2 * (x.q + x.kv), "rotary"))
    out.append(("swiglu", 0.0, B * T * 3 * x.f, "swiglu"))
    out.append(("residual", 0.0, B * T * 6 * d_sh, "residual"))
    return out


#: Forward ops a backward pass needs recomputed when their output is not kept, and what they depend on.
_NEEDS = {"q_proj": ("query_proj",), "k_proj": ("key_proj",), "v_proj": ("value_proj",),
          "attention": ("context",), "o_proj": ("out_proj",), "mlp_gate": ("mlp_gate",),
          "mlp_up": ("mlp_up",), "norms": (), "rotary": (), "swiglu": (), "residual": ()}


def recomputed(pol: RematPolicy) -> list[str]:
    """Forward ops re-run in the backward pass under `pol`. mlp_down's output feeds nothing the backward
    needs, so it is never recomputed; elementwise ops are recomputed unless the policy keeps everything."""
    if "*" in pol.saved:
        return []
    kept = _kept(pol)
    out = [op for op, tags in _NEEDS.items() if tags and not set(tags) <= kept]
    # Attention's inputs: recomputing it needs q, k, v (kept or recomputed: already listed).
    return out + ["norms", "rotary", "swiglu", "residual"]


def saved_bytes_per_token_layer(cfg: ModelConfig, lay: Layout, pol: RematPolicy) -> tuple[float, float]:
    """(HBM, host) bytes one token's activations take per layer under `pol` (per device, sharded)."""
    t = lay.tensor
    x = _Dims.of(cfg, lay, 1, 1)
    width = {"layer_input": cfg.d_model / t, "query_proj": x.q, "key_proj": x.kv, "value_proj": x.kv,
             "context": x.q, "out_proj": cfg.d_model / t, "mlp_gate": x.f, "mlp_up": x.f,
             "mlp_out": cfg.d_model / t}
    if "*" in pol.saved:  # everything, plus norm outputs, rotary q/k, SwiGLU output and attention stats
        hbm = sum(width.values()) + 2 * cfg.d_model / t + x.q + x.kv + x.f
        return ACT_BYTES * hbm, 0.0
    hbm = sum(width[n] for n in set(pol.saved) | {"layer_input"} if n in width and n not in pol.offloaded)
    host = sum(width[n] for n in pol.offloaded if n in width)
    return ACT_BYTES * hbm, ACT_BYTES * host


def _op(name: str, flops: float, nbytes: float, count: float, peak_scale: float = 1.0) -> Op:
    return Op(name, "compute", flops=flops, bytes=nbytes, count=count, source="analytic", peak_scale=peak_scale)


def _collective(name: str, kind: str, size: float, lay: Layout, axis: str, count: float,
                blocking: bool = False) -> list[Op]:
    """One collective of `size` bytes (the gathered / reduced tensor) over `axis`: the in-node share over
    INTRA, the across-node share (bytes / members per node) over INTER."""
    g, k = lay.group(axis)
    if g * k <= 1 or size <= 0 or count <= 0:
        return []

    def fac(n):
        return (2 if kind == "all-reduce" else 1) * (n - 1) / n

    out = []
    if g > 1:
        out.append(Op(f"{name} ({axis})", "collective", bytes=fac(g) * size, count=count, link=INTRA,
                      collective=kind, source="analytic", blocking=blocking))
    if k > 1:
        out.append(Op(f"{name} ({axis}, across nodes)", "collective", bytes=fac(k) * size / g, count=count,
                      link=INTER, collective=kind, source="analytic", blocking=blocking))
    return out


def layer_params(cfg: ModelConfig) -> float:
    """Weights of one transformer layer (matmuls; norms are negligible)."""
    return cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.d_ff


def fp8_rate(chip, dtype: str) -> float:
    """Matrix-unit rate of an fp8 linear layer relative to bf16: chip.peak("float8") / peak("bfloat16") when
    `dtype` is float8 (H100: 2x; v6e: 1x, its catalog fp8 figure equals bf16), else 1."""
    if dtype != "float8" or chip is None or not chip.peak("float8") or not chip.peak("bfloat16"):
        return 1.0
    return chip.peak("float8") / chip.peak("bfloat16")


def _layer_ops(x: _Dims, pol: RematPolicy, count: float, linear_rate: float = 1.0) -> list[Op]:
    """Forward, backward and remat recompute of one layer (per micro-batch, `count` executions).
    linear_rate: the projections' and MLP's matmul rate (fp8_rate); attention's core stays bf16."""
    fwd = _layer_forward(x)
    redo = set(recomputed(pol))
    rate = {n: linear_rate for n in _matmuls(x)}
    ops = [_op(f"fwd {n}", fl, by, count, rate.get(n, 1.0)) for n, fl, by, _ in fwd]
    for n, fl, by, _ in fwd:
        bwd_flops = fl * (2.5 if n == "attention" else 2.0)
        ops.append(_op(f"bwd {n}", bwd_flops, 2 * by, count, rate.get(n, 1.0)))
        if n in redo:
            ops.append(_op(f"remat {n}", fl, by, count, rate.get(n, 1.0)))
    return ops


def _head_ops(cfg: ModelConfig, x: _Dims, count: float) -> list[Op]:
    """Embedding gather, logits matmul (vocab-parallel over tensor) and cross-entropy in fp32."""
    V = cfg.vocab_size / x.t
    T, d, B = x.T, x.d, ACT_BYTES
    fl = 2 * T * d * V * x.pad(d, V)
    return [
        _op("embedding", 0.0, 2 * B * T * d, count),
        _op("fwd logits", fl, B * (T * d + V * d) + 4 * T * V, count),
        _op("bwd logits", 2 * fl, 2 * B * (T * d + V * d) + 4 * T * V, count),
        _op("cross-entropy", 0.0, 3 * 4 * T * V, count),
    ]


def _param_bytes(param_dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4}[param_dtype]


def shard_params(cfg: ModelConfig, lay: Layout) -> float:
    """Parameters whose weights one device holds (sharded over fsdp, tensor and stage)."""
    return cfg.n_params / (lay.fsdp * lay.tensor * lay.stage)


def _collective_ops(cfg: ModelConfig, lay: Layout, x: _Dims, pol: RematPolicy, A: int, L: int,
                    param_dtype: str) -> list[Op]:
    B = ACT_BYTES
    grad_b = 4 if param_dtype == "float32" or lay.zero1 else 2
    lw = layer_params(cfg) / lay.tensor
    head_w = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) / lay.tensor / lay.stage
    ops: list[Op] = []
    for name, w, n in (("layer weights", lw, L * A), ("embedding weights", head_w, A)):
        ops += _collective(f"fsdp all-gather fwd {name}", "all-gather", B * w, lay, "fsdp", n)
        ops += _collective(f"fsdp all-gather bwd {name}", "all-gather", B * w, lay, "fsdp", n)
        ops += _collective(f"fsdp reduce-scatter {name}", "reduce-scatter", grad_b * w, lay, "fsdp", n)
    redo = recomputed(pol)
    n_ar = 4 + ("o_proj" in redo) + ("mlp_gate" in redo)
    # Blocking: each sits between two dependent matmuls (Megatron-LM section 3: f / g operators).
    ops += _collective("tensor all-reduce activations", "all-reduce", B * x.T * x.d, lay, "tensor", n_ar * L * A,
                       blocking=True)
    kv = lay.context * x.T * 2 * x.kv * B
    ops += _collective("context all-gather k/v", "all-gather", kv, lay, "context", 2 * L * A)
    ops += _collective("context reduce-scatter dk/dv", "reduce-scatter", kv, lay, "context", L * A)
    ops += _collective("data all-reduce gradients", "all-reduce", grad_b * shard_params(cfg, lay), lay, "data", 1)
    if lay.stage > 1:
        g, k = lay.group("stage")
        ops.append(Op("pipeline send activations/gradients", "collective", bytes=B * x.T * x.d / x.t,
                      count=2 * A * lay.virtual, link=INTER if k > 1 else INTRA, collective="collective-permute",
                      source="analytic"))
    return ops


def _offload_ops(cfg: ModelConfig, lay: Layout, x: _Dims, pol: RematPolicy, count: float) -> list[Op]:
    """Offloaded activations out (forward) and back (backward) over the host link (PCIe).

    PCIe is full duplex and HOST_LINK is per direction: the copies out and the copies back travel on
    separate lanes, each carrying the offloaded bytes once per step, so the link is busy for one
    direction's bytes (charging both to one direction would serialise traffic the hardware overlaps)."""
    _, host = saved_bytes_per_token_layer(cfg, lay, pol)
    if not host:
        return []
    return [Op("host offload activations (PCIe)", "collective", bytes=host * x.T, count=count,
               link=HOST, collective="host-transfer", source="analytic")]


def matrix_tile(chip) -> int:
    return MATRIX_TILE.get(chip.name, MATRIX_TILE_FAMILY.get(chip.family, 1))


def usable_hbm(chip) -> float | None:
    """HBM bytes one device can fill: the compiler's limit where known, else HBM_USABLE of the catalog's."""
    if chip.hbm_bytes is None:
        return None
    return XLA_TPU_HBM_LIMIT.get(chip.name, HBM_USABLE * chip.hbm_bytes) / chip.devices_per_chip


def machine(chip, dtype: str = "bfloat16") -> Machine:
    """estimate.machine_for with the host link filled in from HOST_LINK (per device)."""
    host = HOST_LINK.get(chip.family)
    return replace(machine_for(chip, dtype), host_bandwidth=None if host is None else host / chip.devices_per_chip)


def train_ops(cfg: ModelConfig, lay: Layout, batch: int, seq: int, remat: str | RematPolicy = "none",
              grad_accum: int = 1, dtype: str = "bfloat16", param_dtype: str = "float32",
              chip=None) -> list[Op]:
    """The ops of one training step on one device (the busiest: every stage is assumed equal).

    batch: global sequences per optimiser step; grad_accum: micro-batches (also the pipeline's).
    dtype: the linear layers' matmul dtype, bfloat16 or float8 (Transformer Engine-style fp8 training: the
    projections and MLP matmuls at the chip's fp8 rate, `fp8_rate`; attention's core, the output layer, the
    elementwise ops and the activations stay bf16). chip: a catalog Chip, for its matrix unit's tile
    (None: no padding). Offloaded activations are HOST ops (price them with `machine(chip)`, which knows
    the host link)."""
    check_layout(cfg, lay, batch, seq, grad_accum)
    pol = resolve_remat(remat)
    A = grad_accum
    L = -(-cfg.n_layers // lay.stage)  # the busiest stage (Megatron splits 126 layers over 8 stages unevenly)
    x = _Dims.of(cfg, lay, batch / lay.replicas / A, seq, 1 if chip is None else matrix_tile(chip))
    if dtype not in ("bfloat16", "float8"):
        raise ValueError(f"training dtype {dtype!r}: bfloat16 or float8")
    ops = _layer_ops(x, pol, L * A, fp8_rate(chip, dtype)) + _head_ops(cfg, x, A)
    if lay.stage > 1:
        frac = (lay.stage - 1) / (A * lay.virtual)
        ops += [_op("pipeline bubble (idle)", o.flops * frac, o.bytes * frac, o.count) for o in ops]
    ops += _offload_ops(cfg, lay, x, pol, L * A)
    P = shard_params(cfg, lay) / (lay.data if lay.zero1 else 1)
    w = _param_bytes(param_dtype)
    ops.append(_op("optimizer update (AdamW)", 10 * P, P * (2 * w + 2 * 8 + w + (2 if w == 4 else 0)), 1))
    return ops + _collective_ops(cfg, lay, x, pol, A, L, param_dtype)


def train_memory(cfg: ModelConfig, lay: Layout, batch: int, seq: int, remat: str | RematPolicy = "none",
                 grad_accum: int = 1, param_dtype: str = "float32") -> float:
    """HBM bytes one device needs at its peak: weights, gradients and AdamW state (sharded per the layout),
    the activations the remat policy saves for every micro-batch in flight, and the larger of two
    transients that are never live together: a layer's backward (one gathered layer, double buffered
    under FSDP, and its working set) and the loss head (one bf16 copy of one micro-batch's logits: the
    loss's fp32 reductions are fused over it and the gradient overwrites it in place)."""
    check_layout(cfg, lay, batch, seq, grad_accum)
    pol = resolve_remat(remat)
    P = shard_params(cfg, lay)
    if lay.zero1:
        state = P * (2 + 4 + 12 / lay.data)
    else:
        w = _param_bytes(param_dtype)
        state = P * (2 * w + 8)
    x = _Dims.of(cfg, lay, batch / lay.replicas / grad_accum, seq)
    hbm_tok, _ = saved_bytes_per_token_layer(cfg, lay, pol)
    in_flight = min(lay.stage, grad_accum) if lay.stage > 1 else 1
    acts = hbm_tok * x.T * -(-cfg.n_layers // lay.stage) * in_flight
    gathered = 2 * ACT_BYTES * layer_params(cfg) / lay.tensor if lay.fsdp > 1 else 0.0
    # One layer's live tensors in its backward: the residual and its gradient, plus the larger of the MLP's
    # (gate, up, SwiGLU) and attention's (q, output, its gradient, k, v) intermediates.
    working = ACT_BYTES * x.T * (2 * x.d / x.t + max(3 * x.f, 3 * x.q + 2 * x.kv))
    head = ACT_BYTES * x.T * cfg.vocab_size / lay.tensor
    return state + acts + max(gathered + working, head)


def serve_ops(cfg: ModelConfig, tensor: int, batch: int, tokens: int, ctx: float, kv_read: float,
              weight_bytes: int = ACT_BYTES, chip=None) -> list[Op]:
    """One forward step of a serving replica, per device of its `tensor` devices (tensor parallel).

    `batch` sequences each add `tokens` tokens (prefill: the prompt; decode: 1), each query attends to
    `ctx` keys on average (prefill: (prompt + 1) / 2, causal; decode: the cached context) and each
    sequence's attention reads `kv_read` cached tokens of K and V from HBM. Per layer: the seven matmuls
    read their weights (`weight_bytes` per element: 1 for fp8) and the activations; attention writes the
    new K / V and reads the cache; the elementwise ops as in training; two blocking all-reduces of the
    activations (Megatron's f / g). Logits only for each sequence's last token (what a server samples)."""
    lay = Layout(tensor=tensor)
    x = _Dims.of(cfg, lay, batch * tokens, 1, 1 if chip is None else matrix_tile(chip))
    x = replace(x, ctx=ctx)
    B, T, L = ACT_BYTES, x.T, cfg.n_layers
    ops = []
    for name, (i, o, w, _) in _matmuls(x).items():
        ops.append(_op(name, 2 * T * i * o * x.pad(i, o), B * T * (i + o) + weight_bytes * w, L))
    cache = B * batch * kv_read * 2 * x.kv
    for name, flops, nbytes, _ in _layer_forward(x):
        if name == "attention":
            ops.append(_op(name, flops, B * T * (2 * x.q + 2 * x.kv) + cache, L))
        elif name not in _matmuls(x):
            ops.append(_op(name, flops, nbytes, L))
    V = cfg.vocab_size / tensor
    ops.append(_op("logits", 2 * batch * x.d * V * x.pad(x.d, V), weight_bytes * V * x.d + 4 * batch * V, 1))
    return ops + _collective("tensor all-reduce activations", "all-reduce", B * T * x.d, lay, "tensor", 2 * L,
                             blocking=True)


def train_model_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one step, all devices (polychip.model.flops: causal attention): the MFU numerator."""
    from polychip.model import flops as F

    return F.train_flops_per_step(cfg, batch, seq)
