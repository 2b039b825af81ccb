"""polychip command line: train | generate | bench | compile | plan | serve | report.

User mistakes (bad config, missing data, wrong checkpoint, impossible mesh) and refusals from the
world (disk full, read-only folder, a binary file where text belongs) print one line
`polychip: error: ...` and exit 2 (`guarded`, the one error boundary); `--debug` shows the traceback
instead. Only real bugs show a traceback without it. Overrides (`section.key=value`) may come
anywhere on the line (`parse_args`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from polychip.config import ConfigError, MODEL_PRESETS, build_config, describe
from polychip.files import check_output_dir

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type, ...]:
    """Every exception type that means "the user asked for something impossible", or that the world
    (disk full, read-only folder, a binary file where text was expected) refused it."""
    errs: list[type] = [ConfigError, OSError, UnicodeError]
    for mod, name in [("yaml", "YAMLError"), ("polychip.data.corpus", "DataError"),
                      ("polychip.train.checkpoint", "CheckpointError"), ("polychip.files", "RunLockedError"),
                      ("polychip.train.health", "NonFiniteError"),
                      ("polychip.hardware.catalog", "HardwareError"), ("polychip.kernels.registry", "KernelError"),
                      ("polychip.parallel.sharding", "ShardingError"), ("polychip.model.hf", "HFError"),
                      ("polychip.compile.errors", "CompileError"), ("polychip.plan.errors", "PlanError"),
                      ("polychip.train.report", "ReportError")]:
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def describe_error(e: BaseException) -> str:
    """One line for a user error; OSErrors read as "what: file" rather than "[Errno 28] ..."."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    if isinstance(e, UnicodeDecodeError):
        return f"cannot read a file as UTF-8 text (byte {e.start}: {e.reason}); is it a binary file?"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def guarded(fn, args, prog: str = "polychip") -> int:
    """The error boundary every CLI entry shares: user errors -> one line `<prog>: error: ...` on
    stderr and exit 2; with --debug they re-raise so the traceback shows."""
    try:
        return int(fn(args) or 0)
    except user_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is what --help is for)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        self.exit(EXIT_USER_ERROR)


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that `section.key=value` overrides may come anywhere (argparse only takes a
    `nargs="*"` positional in its first run of positionals, so `--out R a=1` would be refused)."""
    args, extra = ap.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            ap.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. model.n_layers=4 train.lr=1e-3 (see --help-config)")
    p.add_argument("--preset", choices=list(MODEL_PRESETS), default=None,
                   help="start from a named model + training preset (default: small for train)")
    p.add_argument("--config", metavar="FILE", help="YAML config file applied after the preset")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def _add_dist_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (jax.distributed); default: read from the cluster environment")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's coordinator address")
    g.add_argument("--num-processes", type=int, help="total number of processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--cpu-devices", type=int, help="simulate N CPU devices in this process (testing meshes on CPU)")


def _config_from_args(args, default_preset: str | None = "small"):
    ov = list(args.overrides)
    if getattr(args, "out", None):
        ov.append(f"out_dir={args.out}")
    for flag, key in [("coordinator", "distributed.coordinator"), ("num_processes", "distributed.num_processes"),
                      ("process_id", "distributed.process_id"), ("cpu_devices", "distributed.cpu_devices")]:
        v = getattr(args, flag, None)
        if v is not None:
            ov.append(f"{key}={v}")
    preset = args.preset or (default_preset if not args.config else None)
    return build_config(preset, args.config, ov)


def _print_config_help() -> int:
    for name, default, doc in describe():
        print(f"  {name:<34} {default:<14} {doc}")
    return 0


def cmd_train(args) -> int:
    if args.help_config:
        return _print_config_help()
    cfg = _config_from_args(args)
    why = check_output_dir(cfg.out_dir, "run folder (--out / out_dir)")
    if why:
        raise ConfigError(why)
    from polychip.parallel.distributed import configure_cpu_devices

    configure_cpu_devices(cfg.distributed.cpu_devices)
    from polychip.train.loop import train

    res = train(cfg)
    if res.interrupted:
        return 128 + res.interrupted
    return 0


def _sampling_args(args, gcfg):
    """The command line's sampling settings; those not given come from the model's
    generation_config.json, else greedy."""
    from polychip.infer import SamplingParams, check_text

    sp = SamplingParams(temperature=gcfg.default("temperature", args.temperature, 0.0),
                        top_k=gcfg.default("top_k", args.top_k, 0), top_p=gcfg.default("top_p", args.top_p, 1.0),
                        seed=args.seed, max_tokens=args.max_tokens,
                        stop=[check_text(s, "--stop") for s in args.stop or []])
    sp.validate()
    return sp


def cmd_generate(args) -> int:
    from polychip.generate import Generator
    from polychip.infer import GenerationConfig, check_text, load_for_inference, load_generation_config, read_prompt_file
    from polychip.kernels.registry import KernelPolicy
    from polychip.model.quant import inference_dtypes

    # Everything the user typed is checked before the (slow) checkpoint load.
    _sampling_args(args, GenerationConfig())
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if prompt is None:
        raise ConfigError("give --prompt TEXT or --prompt-file FILE")
    check_text(prompt, "the prompt")
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat")
    cfg, params, tok = load_for_inference(args.checkpoint, args.dtype)
    gcfg = load_generation_config(args.checkpoint, tok)
    if args.stop_token_id:
        gcfg = dataclasses.replace(gcfg, eos_ids=gcfg.eos_ids | frozenset(args.stop_token_id))
    sp = _sampling_args(args, gcfg)
    gen = Generator(cfg, params, tok, KernelPolicy.create(), compute_dtype=inference_dtypes(args.dtype)[1],
                    gcfg=gcfg)
    del params  # the Generator holds them (on a CPU, re-laid out per layer: keep one copy, not two)
    if args.chat:
        msgs = ([{"role": "system", "content": check_text(args.system, "--system")}] if args.system else [])
        r = gen.chat(msgs + [{"role": "user", "content": prompt}], sp)
    else:
        r = gen.generate(prompt, sp)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": r.text, "tokens": r.tokens, "prompt_tokens": r.prompt_tokens,
                          "finish_reason": r.finish_reason}))
    else:
        print(r.text if args.chat else prompt + r.text)
        print(f"\n[{len(r.tokens)} tokens, finish_reason={r.finish_reason}]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.what != "train":
        raise ConfigError(f"unknown benchmark {args.what!r}; available: train")
    if args.help_config:
        return _print_config_help()
    if args.warmup < 0 or args.steps < 1:
        raise ConfigError(f"bench needs --warmup >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    cfg = _config_from_args(args)
    from polychip.parallel.distributed import configure_cpu_devices

    configure_cpu_devices(cfg.distributed.cpu_devices)
    from polychip.train.bench import bench_train

    res = bench_train(cfg, warmup=args.warmup, steps=args.steps)
    if args.json:
        print(json.dumps(res))
    else:
        mfu = res["mfu"]
        print(f"{args.preset or 'config'}: {res['model_params'] / 1e6:.1f}M params, batch {res['batch_size']}x{res['seq_len']}, "
              f"{res['devices']} x {res['device_kind']} ({res['compute_dtype']})")
        print(f"  first step (compile) {res['first_step_s']:.1f} s; median step {res['step_time_median_s'] * 1e3:.1f} ms "
              f"over {len(res['step_times_s'])} steps")
        print(f"  {res['tokens_per_s']:,.0f} tokens/s, {res['model_tflops_per_s_per_device']:.3f} model TFLOP/s per device")
        print(f"  peak {res['peak_source']}: {res['peak_tflops_per_device'] or float('nan'):.3f} TFLOP/s/device -> "
              f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="polychip", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train a model (default: the small preset on the built-in corpus, CPU)",
                       description="Train or resume (same --out resumes from its newest good checkpoint).")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, tokenizer.json, config.yaml")
    _add_dist_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="generate text from a run folder or a Hugging Face Llama folder")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a `train --out` folder or an HF model folder")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, help="0 = greedy; >0 samples (default: the model's "
                                                     "generation_config.json, else 0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0 = off; default: "
                                             "generation_config.json, else off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (1.0 = off; default: generation_config.json, "
                                               "else off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                   help="token id that also ends generation, besides the model's EOS ids (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="float32",
                   help="compute dtype; int8: weight-only int8 matmul weights, float32 compute")
    p.add_argument("--chat", action="store_true", help="the prompt is a user message: render it with the model's "
                                                       "chat template and print the reply")
    p.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks: `bench train` = tokens/s and MFU of the train step")
    p.add_argument("what", choices=["train"], help="what to benchmark")
    _add_config_args(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_dist_args(p)
    p.set_defaults(fn=cmd_bench)

    # Subcommands owned by other packages register themselves through add_parser(sub).
    for mod in ("polychip.compile.cli", "polychip.plan.cli", "polychip.serve.cli", "polychip.train.report"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only a missing optional dependency hides a subcommand; a bug inside it must surface.
            if e.name and e.name.startswith("polychip"):
                raise
            continue
        m.add_parser(sub)
    for p in [ap, *sub.choices.values()]:
        # SUPPRESS: a subcommand's default must not overwrite `polychip --debug <cmd>`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return guarded(args.fn, args, prog=getattr(args, "prog", "polychip"))


if __name__ == "__main__":
    sys.exit(main())
