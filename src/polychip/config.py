"""Typed configuration: nested dataclasses, presets, YAML files and dotted overrides.

Every field has a one-line docstring (the `#:` comment above it); `polychip train --help-config`
prints them. Values that can be derived from others (head_dim, d_ff) are derived in
`ModelConfig.__post_init__`, so a preset names only its dials.

Loading order: preset -> YAML file -> dotted overrides (`model.n_layers=4`). Unknown keys and
impossible shapes raise `ConfigError` with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user mistake in configuration: the CLI prints the message and exits non-zero."""


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 rotary frequency scaling (HF `rope_type="llama3"`)."""

    #: Context-extension factor applied to low frequencies.
    factor: float = 8.0
    #: Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by factor.
    low_freq_factor: float = 1.0
    #: Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept.
    high_freq_factor: float = 4.0
    #: The context length the base model was trained with.
    original_max_position_embeddings: int = 8192


#: ModelConfig.mlp_act values (the gate activation of the gated MLP).
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
#: ModelConfig.router_gate values: softmax over experts (Mixtral, Qwen-MoE) or per-expert sigmoid (DeepSeek-V3).
ROUTER_GATES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
    """Llama-3-style decoder-only transformer. MHA/GQA/MQA differ only in n_kv_heads."""

    #: Vocabulary size (rows of the embedding table).
    vocab_size: int = 4096
    #: Residual stream width.
    d_model: int = 256
    #: Number of transformer blocks.
    n_layers: int = 4
    #: Query heads.
    n_heads: int = 8
    #: Key/value heads (== n_heads: MHA; 1: MQA; otherwise GQA). 0 means n_heads.
    n_kv_heads: int = 0
    #: Per-head width; 0 means d_model // n_heads.
    head_dim: int = 0
    #: SwiGLU hidden width; 0 means Llama's rule: 8/3 * d_model rounded up to multiple_of.
    d_ff: int = 0
    #: Rounding for the derived d_ff.
    multiple_of: int = 64
    #: Longest sequence the model is built for (rotary table length).
    max_seq_len: int = 512
    #: Rotary base frequency.
    rope_theta: float = 500000.0
    #: Llama-3 rotary scaling; None for plain RoPE.
    rope_scaling: RopeScaling | None = None
    #: RMSNorm epsilon.
    norm_eps: float = 1e-5
    #: Share the input embedding with the output projection.
    tie_embeddings: bool = False
    #: Std of the normal initialiser (output projections are scaled by 1/sqrt(2*n_layers)).
    init_std: float = 0.02
    #: Learned biases on the q/k/v projections (Qwen2/2.5).
    qkv_bias: bool = False
    #: Sliding-window attention: each query sees the last N positions, its own included (Mistral); 0: off.
    sliding_window: int = 0
    #: RMSNorm multiplies by (norm_offset + weight): 0 for Llama, 1 for Gemma (zero-centred weights).
    norm_offset: float = 0.0
    #: Multiply token embeddings by sqrt(d_model) (Gemma).
    embed_scale: bool = False
    #: MLP gate activation: "silu" (SwiGLU: Llama, Qwen2, Mistral) or "gelu_tanh" (GeGLU: Gemma).
    mlp_act: str = "silu"
    #: Attention scores -> cap * tanh(scores / cap) (Gemma 2); 0: off.
    attn_softcap: float = 0.0
    #: Output logits -> cap * tanh(logits / cap) (Gemma 2); 0: off.
    final_softcap: float = 0.0
    #: Mixture-of-experts: routed experts per layer replacing the dense MLP (model/moe.py); 0: dense.
    n_experts: int = 0
    #: Experts each token is routed to (top-k).
    experts_per_token: int = 2
    #: Always-on shared experts per layer (DeepSeek, Qwen2-MoE), each expert_d_ff wide.
    n_shared_experts: int = 0
    #: Hidden width of one expert's SwiGLU; 0 means d_ff.
    expert_d_ff: int = 0
    #: Router gate: "softmax" over all experts or "sigmoid" per expert (ROUTER_GATES).
    router_gate: str = "softmax"
    #: Renormalise the top-k gates to sum to 1 (Mixtral, DeepSeek-V3; off for Qwen2-MoE).
    router_norm_topk: bool = True
    #: Multiply the shared experts' output by sigmoid(h . w) (Qwen2-MoE's shared_expert_gate).
    shared_expert_gate: bool = False
    #: Router z-loss coefficient: coef * mean(logsumexp(router logits)^2) (ST-MoE, Zoph et al. 2022, eq. 5).
    router_z_loss: float = 1e-3
    #: Load-balancing loss coefficient: coef * E * sum_e f_e * P_e (Switch Transformer, Fedus et al. 2021, eq. 4).
    router_aux_loss: float = 1e-2

    def __post_init__(self) -> None:
        # Derive dependent dials (frozen dataclass: use object.__setattr__).
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff == 0:
            hidden = int(2 * (4 * self.d_model) / 3)
            m = self.multiple_of
            object.__setattr__(self, "d_ff", m * ((hidden + m - 1) // m))
        if self.expert_d_ff == 0:
            object.__setattr__(self, "expert_d_ff", self.d_ff)
        self.validate()

    def validate(self) -> None:
        check_ranges(self, "model")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ConfigError(f"model.mlp_act={self.mlp_act!r} is not one of {', '.join(MLP_ACTIVATIONS)}")
        if self.router_gate not in ROUTER_GATES:
            raise ConfigError(f"model.router_gate={self.router_gate!r} is not one of {', '.join(ROUTER_GATES)}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(f"model.experts_per_token={self.experts_per_token} must be in [1, model.n_experts="
                              f"{self.n_experts}]")
        if not self.n_experts and (self.n_shared_experts or self.shared_expert_gate):
            raise ConfigError("model.n_shared_experts / model.shared_expert_gate need model.n_experts > 0")
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ConfigError("model.shared_expert_gate needs model.n_shared_experts > 0")

    @property
    def mlp_params(self) -> tuple[int, int]:
        """(stored, active per token) feed-forward weights of one layer: the dense SwiGLU, or the MoE's
        router + experts + shared experts (+ shared gate), of which each token uses k routed experts."""
        d = self.d_model
        if not self.n_experts:
            return 3 * d * self.d_ff, 3 * d * self.d_ff
        expert = 3 * d * self.expert_d_ff
        common = d * self.n_experts + self.n_shared_experts * expert + (d if self.shared_expert_gate else 0)
        return common + self.n_experts * expert, common + self.experts_per_token * expert

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings included, tied ones once)."""
        d, L = self.d_model, self.n_layers
        attn = d * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        per_layer = attn + self.mlp_params[0] + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * per_layer + emb + d


# ----------------------------------------------------------------------------------------------
# Data, training, mesh, kernels
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where tokens come from."""

    #: "stdlib" (this Python's own standard-library sources) or paths/globs of .txt/.py/.jsonl/.parquet files, comma-separated.
    source: str = "stdlib"
    #: Field (JSONL) or column (Parquet) holding the text.
    text_field: str = "text"
    #: Path to a tokenizer.json to use; empty: train a byte-level BPE on the corpus (vocab = model.vocab_size).
    tokenizer: str = ""
    #: Cap on corpus size read (bytes, 0 = no cap); keeps the built-in corpus quick on CPU.
    max_bytes: int = 8_000_000
    #: Fraction of documents held out for evaluation.
    eval_fraction: float = 0.01
    #: Seed for document shuffling and batch order (batches are a pure function of seed and step).
    seed: int = 0


#: Per-layer activations the model tags with `jax.ad_checkpoint.checkpoint_name` (model/transformer.py);
#: a remat policy names which of them the backward pass keeps in HBM and which it keeps on the host.
#: Sizes per token, for the planner: layer_input, out_proj, mlp_out: d_model; query_proj, context:
#: n_heads x head_dim; key_proj, value_proj: n_kv_heads x head_dim; mlp_gate, mlp_up: d_ff.
REMAT_TENSORS = ("layer_input", "query_proj", "key_proj", "value_proj", "context", "out_proj",
                 "mlp_gate", "mlp_up", "mlp_out")


@dataclass(frozen=True)
class RematPolicy:
    """What one remat policy saves for the backward pass; everything else in the layer is recomputed."""

    #: Tagged activations kept in HBM (REMAT_TENSORS names); "*" keeps every intermediate (no remat).
    saved: tuple = ()
    #: Tagged activations moved to host memory in the forward pass and brought back for the backward.
    offloaded: tuple = ()
    doc: str = ""


#: The one list of remat policies: config validation, the model, `compile --search` and the planner read it.
#: Names follow MaxText's where one exists (save_qkv_proj, save_dot_except_mlp, offloaded layer input).
REMAT_POLICIES = {
    "none": RematPolicy(saved=("*",), doc="keep every activation (no recompute)"),
    "dots": RematPolicy(saved=REMAT_TENSORS[1:], doc="keep every matmul output, recompute elementwise work"),
    "save_dot_except_mlp": RematPolicy(
        saved=("query_proj", "key_proj", "value_proj", "context", "out_proj"),
        doc="keep the attention matmul outputs, recompute the MLP"),
    "save_qkvo_proj": RematPolicy(saved=("query_proj", "key_proj", "value_proj", "out_proj"),
                                  doc="keep the q/k/v and output projections"),
    "save_qkv_proj": RematPolicy(saved=("query_proj", "key_proj", "value_proj"),
                                 doc="keep the q/k/v projections"),
    "full": RematPolicy(doc="keep only each layer's input; recompute the whole layer in the backward pass"),
    "offload_layer_input": RematPolicy(offloaded=("layer_input",),
                                       doc="as full, with each layer's input kept in host memory, not HBM"),
}


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop."""

    #: Number of optimiser steps.
    steps: int = 200
    #: Global batch size in sequences (per optimiser step, across all devices and micro-batches).
    batch_size: int = 16
    #: Tokens per training sequence.
    seq_len: int = 256
    #: Micro-batches per step (gradient accumulation); batch_size must divide evenly.
    grad_accum: int = 1
    #: Peak learning rate.
    lr: float = 3e-3
    #: Linear warm-up steps.
    warmup_steps: int = 20
    #: Cosine decay floor as a fraction of lr.
    min_lr_ratio: float = 0.1
    #: AdamW decoupled weight decay (not applied to norms).
    weight_decay: float = 0.1
    #: AdamW beta1.
    b1: float = 0.9
    #: AdamW beta2.
    b2: float = 0.95
    #: AdamW epsilon.
    eps: float = 1e-8
    #: Global-norm gradient clipping threshold (0 disables).
    grad_clip: float = 1.0
    #: Dtype of the stored (master) parameters and optimiser state: float32 or bfloat16.
    param_dtype: str = "float32"
    #: Dtype of matmuls/activations: float32 or bfloat16.
    compute_dtype: str = "float32"
    #: Rematerialisation policy, one of REMAT_POLICIES: none, dots, save_dot_except_mlp, save_qkvo_proj,
    #: save_qkv_proj, full, offload_layer_input (`polychip train --help-config` lists what each keeps).
    remat: str = "none"
    #: Layer loop: scan (compile time independent of depth), unroll, or auto (unroll up to 4 layers).
    layer_loop: str = "auto"
    #: Pipeline micro-batches per (accumulation) batch when mesh.stage > 1; 0: one per stage. At least
    #: mesh.stage; more shrink the bubble (model/pipeline.py gives the fraction).
    pipeline_microbatches: int = 0
    #: Circular pipeline repeats: each stage holds this many non-adjacent layer groups and every
    #: micro-batch passes the stages this many times (smaller bubble; n_layers % (stage x repeats) == 0).
    pipeline_repeats: int = 1
    #: Seed for parameter initialisation.
    seed: int = 0
    #: Print and log metrics every N steps.
    log_every: int = 10
    #: Write a checkpoint every N steps (0: only at the end and on interruption).
    checkpoint_every: int = 100
    #: Number of checkpoints to keep.
    keep_checkpoints: int = 2
    #: Evaluate held-out loss every N steps (0 disables).
    eval_every: int = 0
    #: Steps to capture in a jax.profiler trace under <out_dir>/profile/, e.g. "5-7" or "5" (empty: off).
    profile_steps: str = ""
    #: Write TensorBoard event files into the run folder (process 0).
    tensorboard: bool = True

    def profile_range(self) -> tuple[int, int] | None:
        """(first, last) step of train.profile_steps, both included; None when off."""
        text = self.profile_steps.strip()
        if not text:
            return None
        first, _, last = text.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            lo = hi = 0
        if not 1 <= lo <= hi:
            raise ConfigError(f"train.profile_steps must be a step range like 5-7 or one step like 5 "
                              f"(steps count from 1), got {self.profile_steps!r}")
        if hi > self.steps:
            raise ConfigError(f"train.profile_steps={self.profile_steps} ends after train.steps={self.steps}")
        return lo, hi


@dataclass
class MeshConfig:
    """Device mesh: axes (data, stage, fsdp, context, expert, tensor). -1 on one axis means "all remaining
    devices"."""

    #: Pure data-parallel replicas.
    data: int = 1
    #: Pipeline stages: the layer stack split into this many consecutive groups.
    stage: int = 1
    #: Fully-sharded data parallel (parameters and optimiser state sharded, batch split).
    fsdp: int = -1
    #: Context (sequence) parallel: each sequence split into this many chunks for attention.
    context: int = 1
    #: Expert parallel: mixture-of-experts experts split over this many devices.
    expert: int = 1
    #: Tensor (model) parallel: heads and MLP hidden split.
    tensor: int = 1
    #: Slices (TPU) or nodes (GPU) joined by the slow data-centre network: data (and stage, see
    #: dcn_axes) is split across them first, so only those axes' collectives cross it.
    slices: int = 1
    #: Mesh axes that span slices, outermost first; their product over slices must be `slices`.
    dcn_axes: tuple = ("data",)
    #: Overrides of the logical->mesh rule table, e.g. {"mlp": "tensor", "vocab": null}.
    rules: dict = field(default_factory=dict)
    #: Use only the first N devices (0 = all devices of all processes).
    num_devices: int = 0


@dataclass
class DistributedConfig:
    """Multi-process (multi-controller) runtime; empty fields are read from the cluster environment."""

    #: host:port of process 0's coordinator; empty: single process unless the environment says otherwise.
    coordinator: str = ""
    #: Total number of processes.
    num_processes: int = 0
    #: This process's index.
    process_id: int = -1
    #: Local devices to use on CPU (simulated); 0 leaves XLA's default.
    cpu_devices: int = 0


@dataclass
class KernelsConfig:
    """Per-op implementation choice; "auto" lets the registry pick the first that supports the device."""

    #: Attention implementation: auto, reference, xla, or a hand-written backend name.
    attention: str = "auto"
    #: RMSNorm implementation.
    rms_norm: str = "auto"
    #: Output projection + cross-entropy implementation.
    cross_entropy: str = "auto"
    #: Grouped (ragged) matmul of mixture-of-experts layers.
    grouped_matmul: str = "auto"
    #: Expert-parallel token exchange of mixture-of-experts layers (reference: a padded all_to_all).
    ragged_all_to_all: str = "auto"

    def overrides(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != "auto"}


@dataclass
class Config:
    """Everything a run needs."""

    #: Model shape (or start from a preset with --preset).
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Data source and tokenizer.
    data: DataConfig = field(default_factory=DataConfig)
    #: Training loop.
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Device mesh.
    mesh: MeshConfig = field(default_factory=MeshConfig)
    #: Multi-process runtime.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    #: Kernel implementation overrides.
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    #: Output folder (checkpoints, metrics.jsonl, tokenizer.json, config.yaml).
    out_dir: str = "runs/default"

    def validate(self) -> None:
        """Every field's type and range (RANGES), then the rules that tie fields together."""
        check_ranges(self)
        self.model.validate()
        t = self.train
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        if t.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(t, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"train.{name} must be float32 or bfloat16, got {getattr(t, name)!r}")
        if t.remat not in REMAT_POLICIES:
            raise ConfigError(f"train.remat must be one of {', '.join(REMAT_POLICIES)}, got {t.remat!r}")
        if t.layer_loop not in ("auto", "scan", "unroll"):
            raise ConfigError(f"train.layer_loop must be auto, scan or unroll, got {t.layer_loop!r}")
        t.profile_range()  # raises on a malformed range
        self.check_pipeline()

    def check_pipeline(self) -> None:
        """Refuse (one line) a pipeline the layer stack or batch cannot make (mesh.stage > 1 only)."""
        t, S, R = self.train, self.mesh.stage, self.train.pipeline_repeats
        if S <= 1:
            return
        M = t.pipeline_microbatches or S
        if self.model.n_experts:
            raise ConfigError("pipeline stages (mesh.stage > 1) with a mixture-of-experts model are not supported "
                              "yet: the experts' auxiliary losses do not pass through the pipeline")
        if self.model.n_layers % (S * R):
            raise ConfigError(f"model.n_layers={self.model.n_layers} is not divisible by mesh.stage={S} x "
                              f"train.pipeline_repeats={R}")
        if M < S:
            raise ConfigError(f"train.pipeline_microbatches={M} is fewer than mesh.stage={S} (every stage needs a "
                              "micro-batch in flight)")
        if (t.batch_size // t.grad_accum) % M:
            raise ConfigError(f"micro-batch {t.batch_size // t.grad_accum} (train.batch_size / train.grad_accum) is "
                              f"not divisible by train.pipeline_microbatches={M}")


# ----------------------------------------------------------------------------------------------
# Ranges: one table, checked for every config however it was built (preset, YAML, overrides, code).
# Reasons for the less obvious bounds: AdamW's moment estimates diverge for beta >= 1 and flip sign
# for beta < 0; a zero or negative rope_theta makes the rotary frequencies inf/NaN; keep=0 would let
# Orbax delete the checkpoint just written.
# ----------------------------------------------------------------------------------------------
class Range(typing.NamedTuple):
    """low <= value (or low < value) and value < high (or <= high); None: unbounded."""

    low: float
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = False

    def __contains__(self, v) -> bool:
        above = v >= self.low if self.low_inclusive else v > self.low
        below = self.high is None or (v <= self.high if self.high_inclusive else v < self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return (">= " if self.low_inclusive else "> ") + f"{self.low:g}"
        return (f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}"
                f"{']' if self.high_inclusive else ')'}")


_POS, _NONNEG, _UNIT = Range(0, low_inclusive=False), Range(0), Range(0, 1)

#: dotted key -> allowed range. Every float must also be finite.
RANGES: dict[str, Range] = {
    **{f"model.{k}": _POS for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                                    "max_seq_len", "multiple_of", "rope_theta", "norm_eps")},
    "model.init_std": _NONNEG,
    **{f"model.{k}": _NONNEG for k in ("sliding_window", "attn_softcap", "final_softcap", "n_experts",
                                       "n_shared_experts", "router_z_loss", "router_aux_loss")},
    "model.experts_per_token": _POS, "model.expert_d_ff": _POS,
    **{f"model.rope_scaling.{k}": _POS for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")},
    "data.max_bytes": _NONNEG, "data.eval_fraction": _UNIT, "data.seed": _NONNEG,
    **{f"train.{k}": _POS for k in ("batch_size", "seq_len", "grad_accum", "eps", "keep_checkpoints")},
    **{f"train.{k}": _NONNEG for k in ("steps", "lr", "warmup_steps", "weight_decay", "grad_clip", "seed",
                                       "log_every", "checkpoint_every", "eval_every", "pipeline_microbatches")},
    "train.pipeline_repeats": _POS,
    "train.min_lr_ratio": Range(0, 1, high_inclusive=True), "train.b1": _UNIT, "train.b2": _UNIT,
    "mesh.num_devices": _NONNEG,
    "distributed.num_processes": _NONNEG, "distributed.process_id": Range(-1), "distributed.cpu_devices": _NONNEG,
}

#: Mesh axes: a positive size, or -1 for "all remaining devices".
_MESH_AXES = ("data", "stage", "fsdp", "context", "expert", "tensor")


def check_ranges(obj: Any, where: str = "") -> None:
    """Type and range of every field of dataclass `obj` (recursively); ConfigError names the key."""
    types = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, v = f"{where}.{f.name}" if where else f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_ranges(v, key)
            continue
        tp = types[f.name]
        if v is None and type(None) in typing.get_args(tp):
            continue
        want = {int: int, float: (int, float), str: str, bool: bool}.get(tp)
        if want is not None and (not isinstance(v, want) or (tp is not bool and isinstance(v, bool))):
            raise ConfigError(f"{key} must be {tp.__name__}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v!r}")
        if where == "mesh" and f.name in _MESH_AXES and not (v >= 1 or v == -1):
            raise ConfigError(f"{key} must be a positive size or -1 (all remaining devices), got {v!r}")
        if key in RANGES and v not in RANGES[key]:
            raise ConfigError(f"{key} must be {RANGES[key]}, got {v!r}")


# ----------------------------------------------------------------------------------------------
# Presets. The big ones follow the published Llama-3/3.1 shapes; they are for compile and plan and
# are only ever built abstractly (jax.eval_shape) there.
# ----------------------------------------------------------------------------------------------
_LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, multiple_of=32),
    "small": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "125m": ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=2048, tie_embeddings=True),
    "1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                      max_seq_len=8192, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
    "llama3-8b": ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                             max_seq_len=8192, rope_scaling=_LLAMA3_ROPE),
    "llama3-70b": ModelConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                              max_seq_len=8192, rope_scaling=_LLAMA3_ROPE),
    "llama3-405b": ModelConfig(vocab_size=128256, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, d_ff=53248,
                               max_seq_len=8192, rope_scaling=_LLAMA3_ROPE),
    # Mixture-of-experts. moe-small: dense `small` with each MLP split into 8 experts of half its width,
    # 2 per token, so its active FLOPs per token equal `small`'s (plus a 256x8 router).
    "moe-tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                            multiple_of=32, n_experts=4, experts_per_token=2, n_shared_experts=1, expert_d_ff=64),
    "moe-small": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512,
                             n_experts=8, experts_per_token=2, expert_d_ff=352),
    # Mixtral-8x7B (Jiang et al. 2024; HF config): 8 experts, top-2 softmax, no shared expert.
    "mixtral-8x7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                                max_seq_len=32768, rope_theta=1e6, n_experts=8, experts_per_token=2,
                                router_aux_loss=0.02),
    # DeepSeek-V3-shaped (DeepSeek-AI 2024): 256 routed experts of 2048, top-8 sigmoid gates, 1 shared
    # expert, d_model 7168, 61 layers. Not modelled: MLA (attention here is MHA of 128 heads x 128),
    # the 3 leading dense layers (all 61 are MoE here), group-limited routing, the bias-based balancing.
    "deepseek-v3": ModelConfig(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, head_dim=128, d_ff=18432,
                               max_seq_len=4096, rope_theta=10000.0, n_experts=256, experts_per_token=8,
                               n_shared_experts=1, expert_d_ff=2048, router_gate="sigmoid", router_aux_loss=1e-4),
}

# Training defaults that go with a preset (only where they differ from TrainConfig's).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 20, "batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_every": 5, "checkpoint_every": 10},
    "small": {"steps": 300, "batch_size": 16, "seq_len": 256, "lr": 3e-3, "warmup_steps": 30},
    "125m": {"seq_len": 2048, "batch_size": 32, "lr": 6e-4},
    "1b": {"seq_len": 4096, "batch_size": 32, "lr": 3e-4},
    "llama3-8b": {"seq_len": 8192, "batch_size": 256, "lr": 3e-4},
    "llama3-70b": {"seq_len": 8192, "batch_size": 256, "lr": 1.5e-4},
    "llama3-405b": {"seq_len": 8192, "batch_size": 256, "lr": 8e-5},
    "moe-tiny": {"steps": 20, "batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_every": 5, "checkpoint_every": 10},
    "moe-small": {"steps": 300, "batch_size": 16, "seq_len": 256, "lr": 3e-3, "warmup_steps": 30},
    "mixtral-8x7b": {"seq_len": 4096, "batch_size": 256, "lr": 3e-4},
    "deepseek-v3": {"seq_len": 4096, "batch_size": 256, "lr": 2.2e-4},
}


def preset(name: str) -> Config:
    """A full Config for a named preset."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
    cfg = Config(model=MODEL_PRESETS[name], out_dir=f"runs/{name}")
    for k, v in TRAIN_PRESETS.get(name, {}).items():
        setattr(cfg.train, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# Dict <-> dataclass, YAML, dotted overrides
# ----------------------------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with a clear error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are errors."""
    types = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!r}; valid keys{' under ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, types[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"bad config for {where or cls.__name__}: {e}") from None


def merge(base: Any, data: dict, where: str = "") -> Any:
    """Return a copy of dataclass `base` with the (nested, partial) dict `data` applied."""
    types = _field_types(type(base))
    names = [f.name for f in dataclasses.fields(base)]
    changes = {}
    for k, v in data.items():
        path = f"{where}.{k}" if where else k
        if k not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + where if where else ''}: {', '.join(names)}")
        cur = getattr(base, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            changes[k] = merge(cur, v, path)
        else:
            changes[k] = _coerce(v, types[k], path)
    if isinstance(base, ModelConfig):
        # Derived dials follow their sources unless they were set to something else explicitly.
        for name, derived in _model_derived(base).items():
            if name not in changes and getattr(base, name) == derived:
                changes[name] = 0
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as e:  # pragma: no cover
        raise ConfigError(f"bad config at {where}: {e}") from None


def _model_derived(m: ModelConfig) -> dict[str, int]:
    """What n_kv_heads, head_dim, d_ff and expert_d_ff would be if left at 0."""
    return {f: getattr(dataclasses.replace(m, **{f: 0}), f) for f in ("n_kv_heads", "head_dim", "d_ff", "expert_d_ff")}


def parse_override(text: str) -> dict:
    """`model.n_layers=4` -> {"model": {"n_layers": 4}} (values parsed as YAML scalars)."""
    from polychip import yamlpos

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yamlpos.load(raw, f"override {key}")[0] if raw != "" else ""
    except yamlpos.YamlSyntaxError as e:
        if "not valid YAML" not in str(e):
            raise ConfigError(str(e)) from None
        value = raw  # not YAML: the text itself (a path, a name)
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    from polychip import yamlpos

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        data = yamlpos.load(yamlpos.read_text(p), str(p))[0]
    except yamlpos.YamlSyntaxError as e:
        raise ConfigError(f"config file {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
    return data


def build_config(preset_name: str | None = None, yaml_path: str | None = None, overrides: list[str] = ()) -> Config:
    """preset -> YAML -> dotted overrides, then validation."""
    cfg = preset(preset_name) if preset_name else Config()
    if yaml_path:
        cfg = merge(cfg, load_yaml(yaml_path))
    for o in overrides:
        cfg = merge(cfg, parse_override(o))
    cfg.validate()
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    from polychip.files import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field, read from the `#:` comments in this file."""
    import inspect

    docs: dict[str, str] = {}
    try:
        src = inspect.getsource(cls).splitlines()
        pending = ""
        for line in src:
            s = line.strip()
            if s.startswith("#:"):
                pending = s[2:].strip()
            elif pending and ":" in s and not s.startswith("#"):
                docs[s.split(":")[0].strip()] = pending
                pending = ""
    except (OSError, TypeError):
        pass
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        val = getattr(inst, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(val):
            out.extend(describe(type(val), name + "."))
        else:
            out.append((name, repr(val), docs.get(f.name, "")))
    return out
