#!/usr/bin/env bash
# A separate Python 3.12 venv holding Google MaxText 0.2.4 for deviceless compiles of its published
# recipes (bench/maxtext/compile_recipes.py). Never a dependency of polychip: polychip's own venv and
# pins are untouched. Pins: requirements.txt next to this script (maxtext 0.2.4, jax/jaxlib 0.10.2,
# libtpu 0.0.42.1, and the subset of MaxText's 'tpu' extra that train_compile imports, each at the
# version that extra names). Idempotent: a venv already holding every pin is left as it is.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${MAXTEXT_VENV:-/work/maxtext-venv}
PY=${MAXTEXT_PYTHON:-$HOME/.pyenv/versions/3.12.1/bin/python}
REQ="$HERE/requirements.txt"

pins_ok() {
  "$VENV/bin/python" - "$REQ" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
pins = [l.split("#")[0].strip() for l in open(sys.argv[1])]
pins = [p for p in pins if p]
try:
    bad = [p for p in pins if version(p.split("==")[0]) != p.split("==")[1]]
except PackageNotFoundError as e:
    bad = [str(e)]
sys.exit(1 if bad else 0)
PYEOF
}

if [ -x "$VENV/bin/python" ] && pins_ok; then
  echo "$VENV: already has every pin in $REQ"
  exit 0
fi
[ -x "$PY" ] || { echo "no Python 3.12 at $PY (set MAXTEXT_PYTHON)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
pins_ok || { echo "pip left a pin unmet; see pip output above" >&2; exit 1; }
JAX_PLATFORMS=cpu "$VENV/bin/python" -c "import maxtext.trainers.pre_train.train_compile, jax; print('jax', jax.__version__, 'MaxText train_compile imports')"
