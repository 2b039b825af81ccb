#!/usr/bin/env bash
# Creates .venv (if missing) and installs polychip with pinned dependencies.
#   scripts/setup.sh          -> lean CPU install (what `polychip train/generate` need)
#   scripts/setup.sh dev      -> everything the tests need (libtpu, torch CPU, transformers, ...)
# Re-running is cheap: a stamp file records what was installed for which pyproject/constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.polychip-installed-${extra:-base}"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip==24.3.1 >/dev/null 2>&1 || true
target="."
[ -n "$extra" ] && target=".[$extra]"
# (pip's notes about this machine's extra local indexes are noise; errors still show)
.venv/bin/python -m pip install -q -c constraints.txt -e "$target" 2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$stamp"
