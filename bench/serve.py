"""Serving benchmark in the style of `vllm bench serve`, with a Hugging Face transformers baseline.

Starts `polychip serve` in-process (engine + uvicorn on a loopback port), sends requests with
Poisson arrivals (or all at once with --request-rate inf) through streaming /v1/completions with
token-id prompts and ignore_eos (fixed output lengths, as vLLM's random dataset does), and reports
request and token throughput, TTFT, TPOT and ITL (mean, p50, p99). Then, in the same run, the same
prompts through transformers' `LlamaForCausalLM.generate` on the same weights (exported with
polychip.model.hf.save_hf), one request at a time, greedy, fixed output length.

  JAX_PLATFORMS=cpu python bench/serve.py --checkpoint runs/tiny --num-prompts 64
  python bench/serve.py --preset llama3-8b --dtype bfloat16 --input-len 512 --output-len 256 \
      --num-prompts 512 --max-batch 128 --no-baseline            # on a GPU

Datasets: --dataset random (lengths uniform in [len*(1-r), len*(1+r)], r = --range-ratio) or
fixed (every request exactly --input-len / --output-len).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def summarize(xs: list[float]) -> dict:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def make_requests(args, vocab: int, max_len: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(args.num_prompts):
        if args.dataset == "fixed":
            n, m = args.input_len, args.output_len
        else:
            r = args.range_ratio
            n = int(rng.integers(max(1, int(args.input_len * (1 - r))), int(args.input_len * (1 + r)) + 1))
            m = int(rng.integers(max(1, int(args.output_len * (1 - r))), int(args.output_len * (1 + r)) + 1))
        n = min(n, max_len - 2)
        m = max(1, min(m, max_len - n))
        out.append(([int(t) for t in rng.integers(3, vocab, size=n)], m))
    return out


async def run_load(url: str, model: str, reqs, rate: float, concurrency: int, seed: int) -> dict:
    import httpx

    rng = np.random.default_rng(seed + 1)
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(client, ids, m):
        async with sem:
            body = {"model": model, "prompt": ids, "max_tokens": m, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            times, n_out, ok = [], 0, False
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "error": (await r.aread()).decode()[:200]}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        ok = True
                        break
                    ev = json.loads(data)
                    if ev.get("usage"):
                        n_out = ev["usage"]["completion_tokens"]
                    if ev.get("choices") and ev["choices"][0]["text"]:
                        times.append(time.perf_counter())
            end = time.perf_counter()
            if not ok or not times:
                return {"ok": False, "error": "incomplete stream"}
            return {"ok": True, "prompt": len(ids), "out": n_out, "ttft": times[0] - t0, "latency": end - t0,
                    "itl": list(np.diff(times)),
                    "tpot": (end - times[0]) / (n_out - 1) if n_out > 1 else None}

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        tasks = []
        t_start = time.perf_counter()
        for ids, m in reqs:
            tasks.append(asyncio.create_task(one(client, ids, m)))
            if rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        results = await asyncio.gather(*tasks)
        dur = time.perf_counter() - t_start
    good = [r for r in results if r["ok"]]
    return {
        "duration_s": dur, "completed": len(good), "failed": len(results) - len(good),
        "errors": [r["error"] for r in results if not r["ok"]][:3],
        "request_throughput": len(good) / dur,
        "output_token_throughput": sum(r["out"] for r in good) / dur,
        "total_token_throughput": sum(r["out"] + r["prompt"] for r in good) / dur,
        "ttft_ms": {k: v * 1e3 for k, v in summarize([r["ttft"] for r in good]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in summarize([r["tpot"] for r in good if r["tpot"] is not None]).items()},
        "itl_ms": {k: v * 1e3 for k, v in summarize([x for r in good for x in r["itl"]]).items()},
    }


def _load_entry(a) -> dict:
    return asyncio.run(run_load(*a))


def hf_baseline(cfg, params, reqs, dtype: str, threads: int) -> dict:
    """transformers generate, one request at a time, greedy, exactly m new tokens."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from polychip.model.hf import save_hf

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    with tempfile.TemporaryDirectory() as d:
        save_hf(Path(d) / "hf", cfg, params, dtype="float32" if dtype == "float32" else "bfloat16")
        model = LlamaForCausalLM.from_pretrained(Path(d) / "hf", dtype=getattr(torch, dtype)).eval()
    ttft, tpot, itl, outs = [], [], [], 0
    ids0, m0 = reqs[0]
    with torch.no_grad():
        model.generate(torch.tensor([ids0]), max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t_start = time.perf_counter()
        for ids, m in reqs:
            clk = Clock()
            t0 = time.perf_counter()
            out = model.generate(torch.tensor([ids]), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                                 streamer=clk, pad_token_id=0)
            end = time.perf_counter()
            n = out.shape[1] - len(ids)
            outs += n
            toks = clk.times[1:]  # the first put() is the prompt
            ttft.append(toks[0] - t0)
            itl += list(np.diff(toks))
            if n > 1:
                tpot.append((end - toks[0]) / (n - 1))
        dur = time.perf_counter() - t_start
    return {"duration_s": dur, "completed": len(reqs), "request_throughput": len(reqs) / dur,
            "output_token_throughput": outs / dur,
            "total_token_throughput": (outs + sum(len(i) for i, _ in reqs)) / dur,
            "ttft_ms": {k: v * 1e3 for k, v in summarize(ttft).items()},
            "tpot_ms": {k: v * 1e3 for k, v in summarize(tpot).items()},
            "itl_ms": {k: v * 1e3 for k, v in summarize(itl).items()}}


def print_block(title: str, r: dict) -> None:
    print(f"============ {title} ============")
    print(f"  successful requests        {r['completed']}" + (f"  (failed {r['failed']})" if r.get("failed") else ""))
    print(f"  duration (s)               {r['duration_s']:.2f}")
    print(f"  request throughput (req/s) {r['request_throughput']:.2f}")
    print(f"  output token throughput    {r['output_token_throughput']:.1f} tok/s")
    print(f"  total token throughput     {r['total_token_throughput']:.1f} tok/s")
    for k in ("ttft_ms", "tpot_ms", "itl_ms"):
        s = r[k]
        print(f"  {k[:-3].upper():<5} ms  mean {s['mean']:9.2f}   p50 {s['p50']:9.2f}   p99 {s['p99']:9.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a `polychip train --out` folder or HF Llama folder")
    src.add_argument("--preset", help="random weights of a model preset (e.g. tiny, small, llama3-8b)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--dataset", choices=["random", "fixed"], default="random")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--range-ratio", type=float, default=0.5, help="random dataset: relative length spread")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all at once)")
    ap.add_argument("--max-concurrency", default="256",
                    help="requests in flight; a comma list (e.g. 1,16) runs the load once per level on the same "
                         "server and prints each level's throughput against the first's")
    ap.add_argument("--max-model-len", type=int, help="longest sequence served (default: the model's context)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for the baseline (0: torch's default). Default 1: on a shared, "
                         "oversubscribed CPU, OpenMP's spinning threads made 2 threads ~50x slower than 1")
    ap.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    import jax
    import uvicorn

    from polychip.kernels.registry import KernelPolicy
    from polychip.model import transformer as T
    from polychip.serve.api import build_app
    from polychip.serve.engine import Engine, EngineConfig

    if args.checkpoint:
        from polychip.infer import load_for_inference

        cfg, params, tok = load_for_inference(args.checkpoint, args.dtype)
    else:
        from polychip.config import preset

        cfg = preset(args.preset).model
        params = T.init_params(cfg, jax.random.key(args.seed), T.DTYPES[args.dtype])
        tok = _dummy_tokenizer(cfg.vocab_size)
    ecfg = EngineConfig(max_batch=args.max_batch, page_size=args.page_size, kv_blocks=args.kv_blocks,
                        max_model_len=args.max_model_len, prefill_chunk=args.prefill_chunk, max_queue=max(256, args.num_prompts),
                        compute_dtype=args.dtype)
    engine = Engine(cfg, params, ecfg, KernelPolicy.create())
    t0 = time.perf_counter()
    compiled = engine.warmup()
    print(f"device {jax.devices()[0].device_kind}; {T.count_params(params) / 1e6:.2f}M params; KV pool "
          f"{engine.pool.usable} blocks x {ecfg.page_size}; {len(compiled)} buckets compiled in "
          f"{time.perf_counter() - t0:.1f} s")
    engine.start()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, tok, "bench"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    reqs = make_requests(args, cfg.vocab_size, cfg.max_seq_len)
    print(f"{len(reqs)} requests, {args.dataset} lengths: input mean {np.mean([len(i) for i, _ in reqs]):.0f}, "
          f"output mean {np.mean([m for _, m in reqs]):.0f}; request rate {args.request_rate}")
    # The load generator runs in its own process (as vLLM's does) so its event loop does not compete with
    # the server's for this process's GIL.
    import multiprocessing as mp

    levels = [int(c) for c in str(args.max_concurrency).split(",")]
    res = {}
    with mp.get_context("spawn").Pool(1) as pool:
        for c in levels:
            r = pool.apply(_load_entry, ((f"http://127.0.0.1:{port}", "bench", reqs, args.request_rate, c, args.seed),))
            r["engine_steps"] = engine.stats()["steps"]
            res["serve" if c == levels[-1] else f"serve_concurrency_{c}"] = r
            print_block(f"polychip serve, {c} in flight", r)
            if r["failed"]:
                print("  errors:", r["errors"])
    server.should_exit = True
    th.join(timeout=10)
    engine.stop()
    if len(levels) > 1:
        base = res[f"serve_concurrency_{levels[0]}"]["output_token_throughput"]
        for c in levels[1:]:
            r = res["serve" if c == levels[-1] else f"serve_concurrency_{c}"]
            print(f"output token throughput, {c} in flight / {levels[0]} in flight = "
                  f"{r['output_token_throughput'] / base:.2f}x")
    if not args.no_baseline:
        res["hf_generate"] = hf_baseline(cfg, params, reqs, args.dtype, args.torch_threads)
        print_block("transformers generate, one request at a time", res["hf_generate"])
        ratio = res["serve"]["output_token_throughput"] / res["hf_generate"]["output_token_throughput"]
        print(f"output token throughput: polychip serve / transformers = {ratio:.2f}x")
    res["args"] = {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in vars(args).items()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if not res["serve"]["failed"] else 1


def _dummy_tokenizer(vocab: int):
    """Random-weight presets have no tokenizer; prompts are token ids, and every id decodes to a word
    ("w17 ") so each streamed token is one non-empty chunk."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))


if __name__ == "__main__":
    sys.exit(main())
