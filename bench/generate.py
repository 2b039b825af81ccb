"""Decode speed on a real model: polychip float32 / bfloat16 / int8 vs transformers float32, same run.

SmolLM2-135M-Instruct (the fixture scripts/build_fixtures.py builds; built here when missing), one
chat-templated prompt, batch 1, greedy, exactly --tokens new tokens (EOS ignored on both sides so every
run does the same work). Each engine is warmed up once (compilation), then timed --runs times; the
table gives the median tok/s (new tokens / wall time of the whole call, prefill included) and its
ratio to transformers float32, and the weight bytes each engine streams per second (weights x tok/s:
decoding a token reads every weight once, so on a CPU decode speed is bounded by memory bandwidth).

polychip rows use polychip.generate.Generator as `polychip generate` runs it: the KV cache sized by
polychip.model.transformer.cache_length(prompt + tokens) (a power of two, not the model's 8192-token
context), greedy by argmax (the sampler's vocabulary sort is skipped for temperature 0).

llama.cpp row: its own `llama-bench` (decode only, same token count and thread count) on the Q4_1 GGUF
the fixture was converted from, when `bash bench/llamacpp_build.sh` has built it into the cache.

  JAX_PLATFORMS=cpu python bench/generate.py [--tokens 128] [--runs 3] [--single-thread] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_DEFAULT = Path(os.environ.get("POLYCHIP_CACHE_DIR") or Path.home() / ".cache" / "polychip") / \
    "llamacpp" / "build" / "bin" / "llama-bench"
sys.path.insert(0, str(ROOT / "src"))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _fixtures():
    spec = importlib.util.spec_from_file_location("build_fixtures", ROOT / "scripts" / "build_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fixture() -> Path:
    return _fixtures().build()


def llamacpp_row(binary: Path, tokens: int, runs: int, threads: int) -> dict | None:
    """llama.cpp's own `llama-bench` on the Q4_1 GGUF the fixture was converted from: decode only (-p 0),
    `tokens` generated, mean of `runs` repetitions as it reports them. None when it fails."""
    import json
    import subprocess

    gguf = _fixtures().gguf_path()
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-r", str(runs), "-t", str(threads), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        rec = json.loads(out)[0]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"  llama.cpp: {binary} failed: {e}", file=sys.stderr)
        return None
    return {"engine": f"llama.cpp {gguf.name.split('.')[-2]} (llama-bench, {threads} thread)",
            "tok_s": float(rec["avg_ts"]), "seconds": tokens / float(rec["avg_ts"]), "same_tokens_as_hf": None}


def timed(fn, runs: int) -> tuple[float, list[int]]:
    """(median seconds over `runs` calls after one warm-up call, the tokens of the last call)."""
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def transformers_runner(folder: Path, ids: list[int], n: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inp = torch.tensor([ids])
    # Bytes of weights read per decoded token: all of them for a model with tied embeddings (SmolLM2: the
    # table is the output projection); an untied table's lookup reads one row, so this overstates those.
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def run():
        with torch.no_grad():
            out = model.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    return run, nbytes


def polychip_runner(folder: Path, ids: list[int], n: int, dtype: str):
    import jax

    from polychip.generate import Generator, SamplingParams
    from polychip.infer import load_for_inference
    from polychip.model.quant import inference_dtypes

    cfg, params, _ = load_for_inference(folder, dtype)
    gen = Generator(cfg, params, None, compute_dtype=inference_dtypes(dtype)[1])
    sp = SamplingParams(temperature=0.0, max_tokens=n)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.params))
    return (lambda: gen.generate_ids(ids, sp, eos_id=None)[0]), nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per call (default 128)")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per engine after a warm-up (default 3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--llamacpp", type=Path, default=LLAMACPP_DEFAULT,
                    help="llama-bench binary (default: the one bench/llamacpp_build.sh builds into the cache); "
                         "its row is left out when the file is missing")
    ap.add_argument("--single-thread", action="store_true",
                    help="one compute thread for torch, for XLA's ops and for polychip's CPU matmul kernel (on a "
                         "machine shared with other jobs, torch's spinning thread pool slowed 6x with 2 threads "
                         "on 2 busy cores)")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.runs < 1:
        print("error: --tokens and --runs must be >= 1", file=sys.stderr)
        return 2

    if args.single_thread:
        # Must be set before jax is first imported (the polychip runners import it): Eigen's threads off
        # for XLA's own ops, and one thread per call of polychip's CPU matmul kernel (which otherwise splits
        # its rows over the CPUs). XLA's runtime keeps its dispatch threads; the matmuls run on one.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        os.environ["POLYCHIP_CPU_KERNEL_THREADS"] = "1"
    import torch
    from transformers import AutoTokenizer

    if args.single_thread:
        torch.set_num_threads(1)
    folder = fixture()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"])
    print(f"model {folder.name}, prompt {len(ids)} tokens, {args.tokens} new tokens, batch 1, greedy; "
          f"median of {args.runs}; torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")

    engines = [("transformers float32", lambda: transformers_runner(folder, ids, args.tokens))]
    for dtype in ("float32", "bfloat16", "int8"):
        engines.append((f"polychip {dtype}", lambda d=dtype: polychip_runner(folder, ids, args.tokens, d)))

    rows, ref_tokens = [], None
    for name, make in engines:
        fn, nbytes = make()
        secs, toks = timed(fn, args.runs)
        ref_tokens = toks if ref_tokens is None else ref_tokens
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
        rows.append({"engine": name, "seconds": secs, "tok_s": args.tokens / secs, "same_tokens_as_hf": same,
                     "weight_gb_s": nbytes * args.tokens / secs / 1e9})
        print(f"  {name:<41} {args.tokens / secs:8.1f} tok/s   ({secs:.2f} s)   "
              f"greedy tokens equal to transformers' for the first {same}", flush=True)
    if args.llamacpp.is_file():
        row = llamacpp_row(args.llamacpp, args.tokens, args.runs, 1 if args.single_thread else os.cpu_count())
        if row:
            rows.append(row)
            print(f"  {row['engine']:<41} {row['tok_s']:8.1f} tok/s   (its own greedy decode of the Q4_1 weights)")
    else:
        print(f"  llama.cpp: no binary at {args.llamacpp} (bash bench/llamacpp_build.sh builds it); row left out")
    base = rows[0]["tok_s"]
    # Decoding one token reads every weight once, so weight bytes x tok/s is the memory traffic each engine
    # sustains (prefill included in its time, so slightly understated): on a CPU, decode is bound by it.
    print("\n| engine | tok/s | vs transformers float32 | weights streamed, GB/s |\n|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["tok_s"] / base
        gbs = f"{r['weight_gb_s']:.1f}" if r.get("weight_gb_s") else "-"
        print(f"| {r['engine']} | {r['tok_s']:.1f} | {r['ratio']:.2f}x | {gbs} |")
    if args.json:
        from polychip.files import atomic_write_json

        atomic_write_json(args.json, {"prompt_tokens": len(ids), "new_tokens": args.tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
