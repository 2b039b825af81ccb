#!/usr/bin/env bash
# The main job: set up, train the `small` preset on the built-in corpus on CPU, then generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
out="${OUT_DIR:-runs/small}"
.venv/bin/polychip train --preset small --out "$out" "$@"
.venv/bin/polychip generate --checkpoint "$out" --prompt "def " --max-tokens 200 --temperature 0.8 --top-p 0.95 --seed 0
