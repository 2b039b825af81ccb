#!/usr/bin/env bash
# Sets up .venv with the test dependencies, then runs the test suite on CPU (8 simulated devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
