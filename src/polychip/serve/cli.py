"""`polychip serve`: load a checkpoint, compile the engine's shape buckets, serve HTTP."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from polychip.config import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (paged KV cache, continuous batching)",
                       description="Serve a `polychip train --out` folder or a Hugging Face Llama folder over an "
                                   "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics, /admin/profile).")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a `train --out` folder or an HF model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", metavar="NAME", help="model id reported and required (default: folder name)")
    p.add_argument("--profile-dir", metavar="DIR", help="where POST /admin/profile?steps=N writes jax.profiler traces "
                   "(default: a temporary folder, named in the reply)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="float32",
                   help="compute and KV dtype; int8: weight-only int8 matmul weights, float32 compute and KV")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=16, help="most sequences decoding at once (default 16)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--max-model-len", type=int, metavar="N",
                   help="longest prompt + completion served (default: the model's context); sizes the KV pool")
    g.add_argument("--kv-blocks", type=int,
                   help="KV blocks in the pool (default: max-batch sequences of max-model-len tokens, capped by "
                        "--kv-memory-fraction of free device memory)")
    g.add_argument("--kv-memory-fraction", type=float, default=0.85,
                   help="share of free device memory for the KV cache when --kv-blocks is not given")
    g.add_argument("--prefill-chunk", type=int, default=64,
                   help="most tokens of one prompt per engine step (default 64)")
    g.add_argument("--prefill-rows", type=int, default=4, help="most prompts prefilled together per step (default 4)")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    g.add_argument("--no-prefix-cache", action="store_true", help="do not reuse KV blocks of shared prompt prefixes")
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default: context)")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.set_defaults(fn=cmd_serve)
    return p


def _check_args(args) -> None:
    """Refuse flag values the engine would not catch itself, before the weights are loaded."""
    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_bytes < 1024:
        raise ConfigError(f"--max-request-bytes must be >= 1024, got {args.max_request_bytes}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise ConfigError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    if args.profile_dir and Path(args.profile_dir).exists() and not Path(args.profile_dir).is_dir():
        raise ConfigError(f"--profile-dir {args.profile_dir} exists and is not a folder")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty: give a key, or leave the flag out to serve without one")


def build_server(args):
    """(engine, app) from parsed arguments; the engine is warmed up and started."""
    from polychip.infer import load_for_inference, load_generation_config
    from polychip.kernels.registry import KernelPolicy
    from polychip.model.quant import inference_dtypes
    from polychip.serve.api import ServerLimits, build_app
    from polychip.serve.engine import Engine, EngineConfig

    _check_args(args)
    cfg, params, tok = load_for_inference(args.checkpoint, args.dtype)
    gcfg = load_generation_config(args.checkpoint, tok)
    ecfg = EngineConfig(max_batch=args.max_batch, page_size=args.page_size, kv_blocks=args.kv_blocks,
                        max_model_len=args.max_model_len,
                        kv_memory_fraction=args.kv_memory_fraction, prefill_chunk=args.prefill_chunk,
                        prefill_rows=args.prefill_rows,
                        max_queue=args.max_queue, prefix_cache=not args.no_prefix_cache,
                        compute_dtype=inference_dtypes(args.dtype)[1])
    engine = Engine(cfg, params, ecfg, KernelPolicy.create())
    print(f"polychip serve: {cfg.n_layers} layers, d_model {cfg.d_model}, context {cfg.max_seq_len}, "
          f"serving up to {engine.max_len} tokens x {ecfg.max_batch} sequences; "
          f"KV pool {engine.pool.usable} blocks x {ecfg.page_size} tokens ({engine.kv_bytes / 2**20:.1f} MiB)",
          file=sys.stderr)
    for c in engine.warmup():
        print(f"  compiled {c['kind']:<7} batch {c['batch']:>3} x {c['tokens']:>4} tokens in {c['seconds']:.2f} s",
              file=sys.stderr)
    engine.start()
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens_limit)
    name = args.model_name or Path(args.checkpoint).resolve().name
    profile_dir = Path(args.profile_dir) if args.profile_dir else None
    return engine, build_app(engine, tok, name, api_key=args.api_key, limits=limits, gcfg=gcfg, profile_dir=profile_dir)


def cmd_serve(args) -> int:
    import uvicorn

    engine, app = build_server(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("polychip.serve").warning("binding %s without --api-key: anyone who can reach it can use it",
                                                    args.host)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0
