"""The one FLOPs formula (model FLOPs, vendor-neutral) used for MFU, `compile` and `plan`.

Counted per token, forward pass:
- every matmul with a weight: 2 * (weight elements). That is attention q/k/v/o, the SwiGLU
  gate/up/down, and the output projection (d_model x vocab) whether tied or not. The input
  embedding is a gather, not a matmul, and counts 0. Norms, rotary, softmax and the residual adds are
  elementwise and are left out (under 1% at every preset).
- attention scores and the weighted sum of values: 2 * 2 * n_heads * head_dim * context per layer,
  where context is the number of keys a query attends to. With causal masking the mean context over a
  sequence of length T is (T + 1) / 2; we count that (the work a causal kernel must do), not the full T
  that a dense implementation spends. (PaLM's appendix B counts full T; ours is the lower, stricter
  number, so our MFU is not inflated by masked-out work.)
- mixture-of-experts layers count *active* weights: the router (d_model x n_experts), the k experts a
  token is routed to, and the shared experts (ModelConfig.mlp_params); the other experts' weights
  are stored but do no work for that token, so MFU is stated on active parameters (as MaxText and
  Megatron report MoE MFU). Sorting and the all-to-all exchange move data and count 0.
Training = 3 x forward (backward is twice the forward). Rematerialisation is not counted: this is
model FLOPs utilisation, not hardware FLOPs.
"""
from __future__ import annotations

from polychip.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (embedding lookup excluded, output projection
    included; for MoE the active ones: router, k routed experts, shared experts)."""
    d, L = cfg.d_model, cfg.n_layers
    attn = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return L * (attn + cfg.mlp_params[1]) + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token for QK^T and PV across all layers."""
    context = (seq_len + 1) / 2 if causal else seq_len
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len) * batch_size * seq_len


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs to produce one token when `context` tokens are already cached."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (context + 1)


def mfu(model_flops: float, step_seconds: float, n_devices: int,
        peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: model_flops / (step_seconds x n_devices x peak_flops_per_device).

    A "device" is whatever unit the peak is quoted for (a JAX device, or a chip for catalog peaks);
    n_devices counts those units. None when the peak is unknown or zero, or the step took no time.
    """
    if not peak_flops_per_device or step_seconds <= 0:
        return None
    return model_flops / (step_seconds * n_devices * peak_flops_per_device)
