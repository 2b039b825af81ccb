#!/usr/bin/env bash
# A separate Python 3.12 venv holding Google MaxText 0.2.4 for deviceless compiles of its published
# recipes (bench/maxtext/compile_recipes.py). Never a dependency of polychip: polychip's own venv and
# pins are untouched. Idempotent: an existing venv with the pinned versions is left as it is.
set -euo pipefail
VENV=${MAXTEXT_VENV:-/work/maxtext-venv}
PY=${MAXTEXT_PYTHON:-$HOME/.pyenv/versions/3.12.1/bin/python}
PINS=(maxtext==0.2.4 jax==0.10.2 jaxlib==0.10.2 libtpu==0.0.42.1)

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "${PINS[@]}" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:])
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
then
  echo "$VENV: already has ${PINS[*]}"
  exit 0
fi

[ -x "$PY" ] || { echo "no Python 3.12 at $PY (set MAXTEXT_PYTHON)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install "${PINS[@]}"
"$VENV/bin/python" -c "import jax, maxtext; print('jax', jax.__version__, 'maxtext at', maxtext.__file__)"
