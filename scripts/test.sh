#!/usr/bin/env bash
# Sets up .venv with the test dependencies, then runs the test suite on CPU (8 simulated devices per
# test process) on two pytest-xdist workers, a test file per worker at a time (module fixtures stay
# shared). Extra arguments go to pytest (a later `-n 0` runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
