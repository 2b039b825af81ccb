"""The Llama-3-style decoder as pure functions.

params = {
  "embed":      [V, D]                      (vocab, embed)
  "layers": {   stacked over L for lax.scan (compile time independent of depth)
    "attn_norm": [L, D]                     (layers, norm)
    "wq":        [L, D, H, Dh]              (layers, embed, heads, head_dim)
    "wk", "wv":  [L, D, K, Dh]              (layers, embed, kv_heads, head_dim)
    "wo":        [L, H, Dh, D]              (layers, heads, head_dim, embed)
    "mlp_norm":  [L, D]
    "w_gate", "w_up": [L, D, F]             (layers, embed, mlp)
    "w_down":    [L, F, D]                  (layers, mlp, embed)
    "bq":        [L, H, Dh], "bk", "bv": [L, K, Dh]   (only when cfg.qkv_bias: Qwen2)
  }
  "final_norm": [D]
  "lm_head":    [D, V]  (absent when tie_embeddings: embed.T is used)
}

For serving, the matmul weights may be `quant.QArray`s (int8 + per-output-channel scales); every
matmul goes through `dense`, the embedding lookup through `embed_tokens` and the output projection
through `output_logits`, which accept both.

Family options (ModelConfig): qkv_bias (Qwen2), sliding_window (Mistral), norm_offset / embed_scale /
mlp_act="gelu_tanh" (Gemma), attn_softcap / final_softcap (Gemma 2's soft-capping), n_experts > 0: a
mixture-of-experts feed-forward in place of w_gate/w_up/w_down (model/moe.py lists its weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from polychip.config import ConfigError, ModelConfig
from polychip.kernels.attention import attention
from polychip.kernels.cross_entropy import cross_entropy
from polychip.kernels.quant_matmul import quant_matmul
from polychip.kernels.registry import KernelPolicy
from polychip.kernels.rms_norm import rms_norm
from polychip.model import moe, pipeline
from polychip.model.quant import QArray, upcast
from polychip.model.remat import remat, tag
from polychip.model.rope import apply_rope, inv_frequencies
from polychip.parallel.sharding import Layout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Shallow models unroll the layer loop: compile time stays small at this depth, and the scan's
# per-layer residuals, stacked into [L, ...] buffers (zero-filled, written with dynamic-update-slice
# and read back with dynamic-slice every step), cost 17% of the CPU `small` train step. Deeper models
# keep lax.scan so compile time does not grow with depth.
UNROLL_MAX_LAYERS = 4
BIAS_KEYS = ("['bq']", "['bk']", "['bv']")
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda g: jax.nn.gelu(g, approximate=True)}


@dataclass(frozen=True)
class Runtime:
    """How to run the model (static under jit): kernels, sharding, compute dtype, remat policy."""

    policy: KernelPolicy
    layout: Layout | None = None
    compute_dtype: str = "float32"
    remat: str = "none"
    unroll_layers: bool | None = None  # None: unroll when the model has <= UNROLL_MAX_LAYERS layers
    pipeline_microbatches: int = 0  # when the mesh has stages: micro-batches (0: one per stage)
    pipeline_repeats: int = 1  # circular pipeline repeats (model/pipeline.py)

    def constrain(self, x, axes):
        return x if self.layout is None else self.layout.constrain(x, axes)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names for every parameter (same tree structure as init_params)."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "wq": ("layers", "embed", "heads", "head_dim"),
            "wk": ("layers", "embed", "kv_heads", "head_dim"),
            "wv": ("layers", "embed", "kv_heads", "head_dim"),
            "wo": ("layers", "heads", "head_dim", "embed"),
            "mlp_norm": ("layers", "norm"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        },
        "final_norm": ("norm",),
    }
    if cfg.n_experts:
        axes["layers"] = _moe_layer(axes["layers"], moe.layer_axes(cfg))
    if cfg.qkv_bias:
        axes["layers"].update(bq=("layers", "heads", "head_dim"), bk=("layers", "kv_heads", "head_dim"),
                              bv=("layers", "kv_heads", "head_dim"))
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> dict:
    L, D, H, K, Dh, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                            cfg.vocab_size)
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D), "wq": (L, D, H, Dh), "wk": (L, D, K, Dh), "wv": (L, D, K, Dh),
            "wo": (L, H, Dh, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if cfg.n_experts:
        shapes["layers"] = _moe_layer(shapes["layers"], moe.layer_shapes(cfg))
    if cfg.qkv_bias:
        shapes["layers"].update(bq=(L, H, Dh), bk=(L, K, Dh), bv=(L, K, Dh))
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def _moe_layer(dense: dict, experts: dict) -> dict:
    return {**{k: v for k, v in dense.items() if k not in ("w_gate", "w_up", "w_down")}, **experts}


def init_params(cfg: ModelConfig, key, dtype=jnp.float32) -> dict:
    """Normal(0, init_std) matrices; residual-output projections (wo, w_down) scaled by 1/sqrt(2L)
    (GPT-2 section 2.3); norms at an effective scale of 1 (weight 1 - norm_offset); biases at 0. Each leaf's key is folded from its path, so the values do not
    depend on how the tree is sharded or traversed."""
    shapes = param_shapes(cfg)
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)

    def make(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.full(shape, 1.0 - cfg.norm_offset, dtype)
        if name.endswith(BIAS_KEYS):
            return jnp.zeros(shape, dtype)
        k = jax.random.fold_in(key, sum(ord(c) * 31 ** i for i, c in enumerate(name)) % (2 ** 31))
        std = cfg.init_std * (out_scale if ("wo" in name or "_down" in name) else 1.0)
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=lambda x: isinstance(x, tuple))


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs for the params, without allocating (for compile/plan of big presets)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def output_weight(params: dict, cfg: ModelConfig):
    """[D, V] output projection: lm_head, or the embedding transposed when tied (a quantised tied
    embedding already is its projection's QArray, logical [D, V])."""
    if not cfg.tie_embeddings:
        return params["lm_head"]
    e = params["embed"]
    return e if isinstance(e, QArray) else e.T


def embed_tokens(params: dict, tokens, cfg: ModelConfig, dtype):
    """tokens [B, T] int -> embeddings [B, T, D] in `dtype` (int8 rows dequantised; Gemma's sqrt(D)
    scale, which HF rounds to the compute dtype before multiplying)."""
    e = params["embed"]
    if isinstance(e, QArray):
        x = upcast(jnp.take(e.q, tokens, axis=0), dtype)
        if e.scale is not None:
            x = x * jnp.take(e.scale, tokens, axis=0)[..., None].astype(dtype)
    else:
        x = jnp.take(e, tokens, axis=0).astype(dtype)
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    return x


def soft_cap(x, cap: float):
    """cap * tanh(x / cap) (Gemma 2 section 3); cap 0 leaves x unchanged."""
    return x if not cap else cap * jnp.tanh(x / cap)


def output_logits(h, params: dict, cfg: ModelConfig, policy: KernelPolicy | None = None):
    """Final hidden states [..., D] -> logits [..., V] float32 (soft-capped when cfg.final_softcap)."""
    w = output_weight(params, cfg)
    if isinstance(w, QArray):
        out = dense(h, w, out_dtype=jnp.float32, policy=policy)
    else:
        out = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return soft_cap(out, cfg.final_softcap)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def dense(x, w, n_in: int = 1, out_dtype=None, policy: KernelPolicy | None = None):
    """x [..., *w.shape[:n_in]] contracted with w [*in, *out] -> [..., *out].

    Where the policy says so (KernelPolicy.flat_matmuls: CPU targets, and without a policy), as one 2-D
    matmul: leading (token) dims and the weight's in/out dims are flattened first (free reshapes of
    contiguous arrays), so forward and both backward products are plain [M, K] x [K, N] GEMMs with
    a single contracting dim. An einsum over [B, T, D] contracts two dims (batch and seq) for the
    weight gradient, and XLA's CPU backend then materialises a transposed copy of the
    [B*T, out] activation gradient with a strided (cache-missing) loop: the `small` preset's MLP
    backward measured 2.3x slower than this form. Elsewhere, one dot_general over the activation's own
    shape: the same math and FLOPs, and TPU's layout assignment copies less (see flat_matmuls).

    w may be a float array (cast to x's dtype) or a QArray: the int8 weight is converted to x's dtype
    inside the matmul and the per-output-channel scales multiply the [M, N] product, which equals
    x @ (q * scale) because each output column has one scale (model/quant.py). With a `policy` and float32
    activations, quantised weights go through the kernel registry's quant_matmul (hand-written CPU
    kernels for decode shapes)."""
    lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    K, N = math.prod(ins), math.prod(outs)
    pet = out_dtype or x.dtype
    if isinstance(w, QArray) and policy is not None and x.dtype == jnp.float32:
        scale = None if w.scale is None else w.scale.reshape(N)
        y = quant_matmul(x.reshape(-1, K), w.q.reshape(N, K), scale, policy=policy).astype(pet)
    elif isinstance(w, QArray):  # q is [N, K] (output-major; see QArray for why)
        y = jnp.dot(x.reshape(-1, K), upcast(w.q.reshape(N, K).T, x.dtype), preferred_element_type=pet)
        if w.scale is not None:
            y = y * w.scale.reshape(N).astype(pet)
    elif policy is None or policy.flat_matmuls:
        y = jnp.dot(x.reshape(-1, K), w.reshape(K, N).astype(x.dtype), preferred_element_type=pet)
    else:
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, w.astype(x.dtype), (contract, ((), ())), preferred_element_type=pet)
    return y.reshape(*lead, *outs)


def norm(x, w, cfg: ModelConfig, rt: Runtime):
    """RMSNorm with scale (norm_offset + w), the offset added in float32 (Gemma's (1 + w))."""
    scale = w if not cfg.norm_offset else w.astype(jnp.float32) + cfg.norm_offset
    return rms_norm(x, scale, eps=cfg.norm_eps, policy=rt.policy)


def attention_options(cfg: ModelConfig) -> dict:
    """The attention kernel's per-model options (every attend() passes them on)."""
    return dict(sliding_window=cfg.sliding_window or None, soft_cap=cfg.attn_softcap or None)


def block(x, lp, positions, cfg: ModelConfig, rt: Runtime, inv_freq, attend=None, state=None):
    """One pre-norm block. x [B, T, D], positions [B, T].

    `attend(q, k, v, state) -> (o, state)` receives the rotated q [B, T, H, Dh] and k, v [B, T, K, Dh]
    and decides where keys/values live: None is causal self-attention over these T tokens; a
    contiguous KV cache (`contiguous_cache_attend`) and the server's paged cache plug in here, so
    the block is defined once for training, generation and serving. Returns (x, state, aux): aux holds
    this layer's mixture-of-experts auxiliary losses ({} for a dense MLP)."""
    x = tag(x, "layer_input")
    h = norm(x, lp["attn_norm"], cfg, rt)
    pol = rt.policy
    if "wqkv" in lp:  # fuse_projections' layout: one matmul, split into q, k, v
        H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = jnp.split(dense(h, lp["wqkv"], policy=pol), [H * Dh, (H + K) * Dh], axis=-1)
        q, k, v = (t.reshape(*t.shape[:-1], n, Dh) for t, n in ((q, H), (k, K), (v, K)))
    else:
        q, k, v = dense(h, lp["wq"], policy=pol), dense(h, lp["wk"], policy=pol), dense(h, lp["wv"], policy=pol)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"].astype(h.dtype), k + lp["bk"].astype(h.dtype), v + lp["bv"].astype(h.dtype)
    q = rt.constrain(q, ("batch", "seq", "act_heads", "head_dim"))
    q, k, v = tag(q, "query_proj"), tag(k, "key_proj"), tag(v, "value_proj")
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if attend is None:
        o = attention(q, k, v, policy=rt.policy, causal=True, **attention_options(cfg))
    else:
        o, state = attend(q, k, v, state)
    o = tag(o, "context")
    x = x + tag(dense(o, lp["wo"], n_in=2, policy=pol), "out_proj")
    x = rt.constrain(x, ("batch", "seq", "act_embed"))
    h = norm(x, lp["mlp_norm"], cfg, rt)
    aux = {}
    if cfg.n_experts:
        y, aux = moe.feed_forward(h, lp, cfg, rt, _ACTIVATIONS[cfg.mlp_act])
    else:
        if "w_gateup" in lp:  # fuse_projections' layout
            g, u = jnp.split(dense(h, lp["w_gateup"], policy=pol), 2, axis=-1)
        else:
            g, u = dense(h, lp["w_gate"], policy=pol), dense(h, lp["w_up"], policy=pol)
        g, u = tag(g, "mlp_gate"), tag(u, "mlp_up")
        a = rt.constrain(_ACTIVATIONS[cfg.mlp_act](g) * u, ("batch", "seq", "act_mlp"))
        y = dense(a, lp["w_down"], policy=pol)
    x = rt.constrain(x + tag(y, "mlp_out"), ("batch", "seq", "act_embed"))
    return x, state, aux


def contiguous_cache_attend(rt: Runtime, cache_pos, cfg: ModelConfig):
    """attend() for a contiguous cache and state (cache, layer): write the new keys/values into the layer's
    cache at cache_pos (in place), then attend over it with the queries offset to cache_pos (decoding).
    The cache is {"k","v"}: [L, B, S, K, Dh], or a tuple of per-layer {"k","v"}: [B, S, K, Dh] (the
    unstacked inference layout, where reading a layer's slice of a stacked cache would copy it)."""

    def attend(q, k, v, state):
        cache, i = state
        per_layer = isinstance(cache, tuple)
        c = cache[i] if per_layer else cache
        at = (0, cache_pos, 0, 0) if per_layer else (i, 0, cache_pos, 0, 0)
        new = {n: jax.lax.dynamic_update_slice(c[n], (t if per_layer else t[None]).astype(c[n].dtype), at)
               for n, t in (("k", k), ("v", v))}
        ck, cv = (new["k"], new["v"]) if per_layer else (new["k"][i], new["v"][i])
        o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), policy=rt.policy, causal=True, q_offset=cache_pos,
                      **attention_options(cfg))
        return o, ((*cache[:i], new, *cache[i + 1:]) if per_layer else new, i)

    return attend


def layer_loop(step, carry, layers, unroll: bool = False):
    """lax.scan over the layers, step(carry, layer params, layer index) -> (carry, y); returns (carry, ys).

    `layers` is the stacked tree ([L, ...] leaves), scanned with a traced index, or a tuple of per-layer
    trees (`unstack_layers`), looped over in Python with an int index (one unrolled program)."""
    if isinstance(layers, tuple):
        ys = []
        for i, lp in enumerate(layers):
            carry, y = step(carry, lp, i)
            ys.append(y)
        return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))
    n = jax.tree.leaves(layers)[0].shape[0]
    return jax.lax.scan(lambda c, xs: step(c, *xs), carry, (layers, jnp.arange(n, dtype=jnp.int32)), unroll=unroll)


def unstack_layers(params: dict) -> dict:
    """params with "layers" as a tuple of per-layer trees instead of one tree stacked on a layer axis.

    For inference on CPU (infer.inference_layout): inside lax.scan, XLA's CPU backend copies every layer's
    weights out of the stacked arrays before each matmul (a dynamic-slice fusion per weight; jax.profiler
    on SmolLM2's float32 decode step: 58 of 88 ms), while separate arrays are read in place. hidden_states
    and the paged serving step loop over a tuple in Python. Quantised weights (QArray) slice the same way."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))}


#: Projections that read the same input, fused into one weight by fuse_projections: name -> parts.
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gateup": ("w_gate", "w_up")}


def fuse_projections(params: dict) -> dict:
    """Unstacked params (unstack_layers) with each layer's q/k/v projections, and its gate/up projections,
    stored as one output-major QArray each ("wqkv", "w_gateup"; block() splits the product): one matmul
    kernel call per group instead of two or three. For CPU decoding (infer.inference_layout): each call of
    the weight-streaming kernel has a fixed cost (waking its helper threads, the prefetch ramp), which the
    small k and v projections do not amortise; SmolLM2's 211 float32 decode matmuls took 21.9 ms, its 121
    fused ones 20.5 ms. Only QArrays of one dtype, one input shape and alike scales are fused (their
    output rows simply concatenate); anything else is left as it is."""
    def fuse(lp: dict) -> dict:
        for name, parts in FUSED.items():
            ws = [lp.get(n) for n in parts]
            if not all(isinstance(w, QArray) and w.q.ndim == 2 for w in ws):
                continue
            if len({(w.in_shape, w.q.dtype, w.scale is None) for w in ws}) != 1:
                continue
            scale = None if ws[0].scale is None else jnp.concatenate([w.scale for w in ws])
            fused = QArray(jnp.concatenate([w.q for w in ws]), scale, ws[0].in_shape, (sum(w.q.shape[0] for w in ws),))
            lp = {**{k: v for k, v in lp.items() if k not in parts}, name: fused}
        return lp

    if not isinstance(params["layers"], tuple):
        return params
    return {**params, "layers": tuple(fuse(lp) for lp in params["layers"])}


def hidden_states(params: dict, tokens, cfg: ModelConfig, rt: Runtime, positions=None, cache=None, cache_pos=None):
    """tokens [B, T] int -> (final-normed hidden states [B, T, D] in compute dtype, the new cache, aux).

    cache (optional): {"k", "v"}: [L, B, S, K, Dh]; cache_pos: int scalar, where tokens[:, 0] goes.
    aux: each block's auxiliary losses stacked over layers ({} for dense models).
    """
    dt = DTYPES[rt.compute_dtype]
    B, T = tokens.shape
    if positions is None:
        base = jnp.arange(T, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(base + (0 if cache_pos is None else cache_pos), (B, T))
    inv_freq = inv_frequencies(cfg)
    if not isinstance(params["embed"], QArray):
        # The lookup's table layout is a rule ("embed_lookup"), not the stored one. Sharded on embed
        # (default) the backward pass moves the batch's activation gradient between the devices
        # (all-to-all, or an all-gather on some meshes) to scatter-add each device's D columns; over
        # slices that crosses the data-centre network, so multi-slice meshes gather the table within
        # the slice instead and reduce its [V, D] gradient like any other weight's (StepSpec.build).
        params = {**params, "embed": rt.constrain(params["embed"], ("vocab", "embed_lookup"))}
    x = embed_tokens(params, tokens, cfg, dt)
    x = rt.constrain(x, ("batch", "seq", "act_embed"))

    unroll = rt.unroll_layers if rt.unroll_layers is not None else cfg.n_layers <= UNROLL_MAX_LAYERS
    if cache is not None or isinstance(params["layers"], tuple):
        # Inference: the whole cache (stacked [L, ...], or a tuple per layer) is carried and each layer
        # writes its own part in place.
        attend = None if cache is None else contiguous_cache_attend(rt, cache_pos, cfg)

        def step(carry, lp, i):
            x, c = carry
            x, state, _ = block(x, lp, positions, cfg, rt, inv_freq, attend, None if c is None else (c, i))
            return (x, None if state is None else state[0]), None

        (x, new_cache), _ = layer_loop(step, (x, cache), params["layers"], unroll)
        aux = {}
    else:
        def body(carry, lp, positions=positions):
            x, _, aux = block(carry, lp, positions, cfg, rt, inv_freq)
            return x, aux

        body = remat(body, rt.remat)
        if pipeline.stages(rt) > 1:
            # MoE auxiliary losses do not pass through the pipeline's carry: Config.check_pipeline refuses MoE.
            x, aux = pipeline.pipeline(body, params["layers"], param_axes(cfg)["layers"], x, positions, rt,
                                       unroll=bool(unroll)), {}
        else:
            x, aux = jax.lax.scan(body, x, params["layers"], unroll=bool(unroll))
        new_cache = None
    x = norm(x, params["final_norm"], cfg, rt)
    return x, new_cache, aux


def logits(params: dict, tokens, cfg: ModelConfig, rt: Runtime, **kw):
    """tokens [B, T] -> logits [B, T, V] float32 (and the new cache when one was given)."""
    h, new_cache, _ = hidden_states(params, tokens, cfg, rt, **kw)
    out = output_logits(h, params, cfg, rt.policy)
    out = rt.constrain(out, ("batch", "seq", "act_vocab"))
    return out, new_cache


def loss_fn(params: dict, batch, cfg: ModelConfig, rt: Runtime):
    """The training objective. batch [B, T+1] int32: inputs batch[:, :-1], targets batch[:, 1:].

    Returns (mean next-token cross-entropy + MoE auxiliary losses, token count)."""
    objective, metrics = loss_and_metrics(params, batch, cfg, rt)
    return objective, metrics["tokens"]


def loss_and_metrics(params: dict, batch, cfg: ModelConfig, rt: Runtime):
    """(objective, metrics): metrics["loss"] is the mean cross-entropy, "tokens" the token count, and
    for MoE models "moe_aux_loss" (what the objective adds to the loss) with its two parts, the
    load-balancing and z-loss averaged over layers (unweighted; model/moe.py). The output projection +
    CE goes through the kernel registry so a fused, chunked implementation can avoid materialising
    [B*T, V] logits."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    h, _, aux = hidden_states(params, inputs, cfg, rt)
    B, T, D = h.shape
    if cfg.final_softcap:
        # The fused kernels see only h and W; the cap sits between them, so the logits are formed here.
        lg = output_logits(h, params, cfg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), targets[..., None], axis=-1)
        loss, count = jnp.mean(nll), jnp.float32(B * T)
    else:
        w = output_weight(params, cfg).astype(h.dtype)
        mask = jnp.ones((B * T,), jnp.float32)
        total, count = cross_entropy(h.reshape(B * T, D), w, targets.reshape(B * T), mask, policy=rt.policy)
        loss = total / count
    metrics = {"loss": loss, "tokens": count}
    if not aux:
        return loss, metrics
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    metrics["moe_aux_loss"] = cfg.router_aux_loss * metrics["moe_lb_loss"] + cfg.router_z_loss * metrics["moe_z_loss"]
    return loss + metrics["moe_aux_loss"], metrics


#: Smallest KV cache length cache_length() hands out (one compiled decode step serves short chats).
MIN_CACHE_LEN = 256


def cache_length(n_tokens: int, cfg: ModelConfig, min_len: int = MIN_CACHE_LEN) -> int:
    """KV cache length for a sequence that will hold `n_tokens` (prompt + new tokens): the next power
    of two >= n_tokens (at least min_len), capped at cfg.max_seq_len.

    Every decode step reads the whole cache, so a cache sized for the model's full context costs each
    step max_seq_len / n_tokens times the memory traffic it needs (SmolLM2: 8192 vs ~200 tokens, the
    issue-11 slowdown). Powers of two bound the number of compiled shapes to log2(max_seq_len)."""
    if n_tokens > cfg.max_seq_len:
        raise ConfigError(f"{n_tokens} tokens exceed the model's context of {cfg.max_seq_len}")
    n = max(min_len, 1)
    while n < n_tokens:
        n *= 2
    return min(n, cfg.max_seq_len)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, per_layer: bool = False):
    """Zeroed contiguous KV cache {"k", "v"}: [L, batch, max_len, K, Dh] (size max_len with cache_length),
    or with per_layer a tuple of L {"k", "v"}: [batch, max_len, K, Dh] (for unstacked layers)."""
    if per_layer:
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers))
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_axes() -> dict:
    ax = ("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim")
    return {"k": ax, "v": ax}


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
