#!/usr/bin/env bash
# One-command GPU suite: train-step MFU (125m, 1b), flash attention (our Pallas kernel vs cuDNN vs XLA,
# with parity checks) and serving throughput (1b), all measured on this machine's first GPU; then the
# train and serve figures as planner records (`polychip plan FLEET --records OUT/records`).
#
#   bash bench/gpu_suite.sh [--out DIR] [--tar FILE]    # on a GPU machine; < 8 minutes with set-up
#   bash bench/gpu_suite.sh --smoke --no-setup --out DIR   # CPU plumbing check: tiny preset, seconds a part
#   bash bench/gpu_suite.sh --fetch-wheels              # here, with PyPI: serving's wheels into .whl/
#
# Output (DIR, default runs/gpu_suite): device.json, train_<preset>.json (+ .meta, .log), attention.json,
# serve.json (+ .log), records/*.json, summary.txt. --tar FILE also packs DIR into one archive. With $OUT
# set (the device tool) and no --out: DIR is /tmp/gpu_suite, packed into $OUT/gpu_suite.tgz, plus
# $OUT/summary.txt (that tool brings back at most 8 files).
#
# Set-up (skipped with --no-setup: then $PYTHON, else python3, is used as is, with src/ on PYTHONPATH):
# the first of $PYTHON, .venv/bin/python, python3 whose JAX sees a GPU is used (a machine with no
# network, like the device tool's, has JAX and CUDA in its image); serving's packages missing there
# (fastapi, uvicorn, pydantic, ...) are installed from .whl/ (or $GPU_SUITE_WHEELS) if present, else
# from PyPI. No GPU JAX anywhere: `scripts/setup.sh gpu` (needs network; jax[cuda12] is large).
#
# Time: every part runs under `timeout`, capped by what is left of GPU_SUITE_BUDGET_S (default 450 s,
# counted from the start, set-up included), so the whole stays under 8 minutes. A part that fails or
# runs out of time is reported and the others still run; exit status 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SMOKE="${GPU_SUITE_SMOKE:-0}"
SETUP=1
DIR=""
TAR=""
BUDGET="${GPU_SUITE_BUDGET_S:-450}"
WHEELS="${GPU_SUITE_WHEELS:-.whl}"
# Serving's packages absent from the device tool's image (pins from constraints.txt).
SERVE_WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0
 typing-inspection==0.4.5 annotated-doc==0.0.7 uvicorn==0.54.0 opentelemetry-api==1.45.2 typing_extensions==4.16.0"

die() { echo "gpu_suite: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --no-setup) SETUP=0 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; DIR="$2"; shift ;;
    --tar) [ $# -ge 2 ] || die "--tar needs a file name"; TAR="$2"; shift ;;
    --fetch-wheels)
      mkdir -p "$WHEELS"
      # shellcheck disable=SC2086
      exec "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $SERVE_WHEELS ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "GPU_SUITE_BUDGET_S must be whole seconds, got $BUDGET"
COPY_SUMMARY=""
if [ -z "$DIR" ] && [ -n "${OUT:-}" ]; then
  # Under the device tool, which brings back at most 8 files from $OUT: one archive and the summary.
  DIR=/tmp/gpu_suite; TAR="${TAR:-$OUT/gpu_suite.tgz}"; COPY_SUMMARY="$OUT/summary.txt"
fi
DIR="${DIR:-runs/gpu_suite}"
mkdir -p "$DIR" || die "cannot create $DIR"
DIR="$(cd "$DIR" && pwd)"
export PYTHONUNBUFFERED=1
START=$SECONDS
RESERVE=20  # kept back for records and the summary

# Seconds a part may take: what it wants, capped by what is left of the budget.
allow() {
  local left=$(( BUDGET - (SECONDS - START) - RESERVE ))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

STATUS=()
FAILED=0
note() { STATUS+=("$1"); echo "== $1"; }

# run PART WANT_SECONDS LOG CMD...: runs CMD under timeout, output to the terminal and appended to LOG;
# returns its status.
run_part() {
  local part="$1" want="$2" log="$3"; shift 3
  local t; t=$(allow "$want")
  if [ "$t" -lt 10 ]; then
    note "$part: skipped (time budget spent)"; return 1
  fi
  echo "== $part (up to ${t} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    note "$part: ok in $(( SECONDS - t0 )) s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "$part: TIMED OUT after ${t} s (see $log)"
  else
    note "$part: FAILED, exit $rc (see $log)"
  fi
  return "$rc"
}

probe() {  # prints the platform JAX sees with interpreter $1, or nothing
  timeout 90 "$1" -c 'import jax; print(jax.devices()[0].platform)' 2>/dev/null | tail -1
}

missing_modules() {  # the modules of $@ that $PY cannot import
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

setup() {
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$SETUP" = 0 ]; then
    PY="${PYTHON:-python3}"
    command -v "$PY" >/dev/null || die "no interpreter $PY (set PYTHON)"
    return 0
  fi
  local want=gpu extra=gpu
  [ "$SMOKE" = 1 ] && want=cpu extra=
  PY=""
  for cand in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null || continue
    if [ "$(probe "$cand")" = "$want" ]; then PY="$cand"; break; fi
  done
  if [ -z "$PY" ]; then
    echo "no interpreter here has JAX on $want: scripts/setup.sh $extra (needs network; jax[cuda12] is large)"
    timeout "$(allow 240)" bash scripts/setup.sh $extra || die "set-up failed (scripts/setup.sh $extra)"
    PY=.venv/bin/python
    [ "$(probe "$PY")" = "$want" ] || die "JAX in .venv sees no $want (nvidia-smi? CUDA driver?)"
  fi
  local core; core=$(missing_modules jax optax yaml rich tokenizers safetensors numpy)
  [ -z "$core" ] || die "$PY lacks $core: run scripts/setup.sh $extra on a machine with network"
  if [ -n "$(missing_modules fastapi uvicorn httpx)" ]; then
    local site=/tmp/gpu_suite_site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      echo "installing serving's packages from $WHEELS into $site"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
    else
      echo "installing serving's packages from PyPI into $site"
      # shellcheck disable=SC2086
      timeout 90 "$PY" -m pip install -q --no-deps --upgrade --retries 0 --timeout 10 --target "$site" $SERVE_WHEELS
    fi
    export PYTHONPATH="$PYTHONPATH:$site"
    [ -z "$(missing_modules fastapi uvicorn httpx)" ] ||
      echo "serving's packages still missing (no network? run --fetch-wheels where PyPI is reachable, carry $WHEELS)"
  fi
}

echo "== set-up"
if [ "$SMOKE" = 1 ]; then export JAX_PLATFORMS=cpu; fi
setup
echo "python: $PY; out: $DIR; budget ${BUDGET} s; smoke: $SMOKE"
"$PY" bench/gpu_records.py device "$DIR/device.json" || die "could not start JAX with $PY"
note "set-up: ok in $(( SECONDS - START )) s"

# (a) train step, bfloat16. Each preset: "batch seq remat" attempts, the next one only if the last failed
# (not timed out). `polychip plan` estimates 14 GB (125m, 16x2048) and 39 GB (1b, 8x2048) with flash
# attention; if attention falls back to XLA's, which keeps fp32 scores per layer (XLA:CPU asked for 46 GB
# for 125m at 16x2048), 125m still fits 80 GB and 1b falls back to batch 4 with full remat.
if [ "$SMOKE" = 1 ]; then
  TRAIN=("tiny|8 64 none") STEPS=(--warmup 1 --steps 2); TRAIN_S=(60)
else
  TRAIN=("125m|16 2048 none,8 2048 none" "1b|8 2048 none,4 2048 full") STEPS=(--warmup 3 --steps 10)
  TRAIN_S=(100 130)
fi
for i in "${!TRAIN[@]}"; do
  preset="${TRAIN[$i]%%|*}"
  IFS=, read -ra tries <<<"${TRAIN[$i]#*|}"
  : >"$DIR/train_$preset.log"  # every attempt's output, appended
  for try in "${tries[@]}"; do
    read -r b s r <<<"$try"
    rm -f "$DIR/train_$preset.json"
    printf '{"remat": "%s"}\n' "$r" >"$DIR/train_$preset.meta"
    run_part "train $preset batch ${b}x${s} remat $r" "${TRAIN_S[$i]}" "$DIR/train_$preset.log" \
      "$PY" bench/train_step.py --presets "$preset" --dtype bfloat16 --batch "$b" --seq "$s" --remat "$r" \
      "${STEPS[@]}" --json "$DIR/train_$preset.json"
    rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && break
  done
  [ "$rc" -eq 0 ] || FAILED=1
done

# (c) serving before (b): its figures become planner records, the attention table does not.
if [ "$SMOKE" = 1 ]; then
  SERVE=(--preset tiny --max-concurrency 1,4 --max-batch 4 --num-prompts 8 --input-len 16 --output-len 8
         --max-model-len 64) SERVE_S=90
else
  SERVE=(--preset 1b --max-concurrency 1,16,64 --max-batch 64 --num-prompts 64 --input-len 256 --output-len 64
         --max-model-len 1024) SERVE_S=170
fi
rm -f "$DIR/serve.json"; : >"$DIR/serve.log"
run_part "serve ${SERVE[1]}" "$SERVE_S" "$DIR/serve.log" "$PY" bench/serve.py "${SERVE[@]}" --dtype bfloat16 \
  --dataset fixed --no-baseline --json "$DIR/serve.json" || FAILED=1

# (b) flash attention fwd and fwd+bwd: Pallas (Triton) vs cuDNN vs XLA, parity at the shortest length.
rm -f "$DIR/attention.json"; : >"$DIR/attention.log"
if [ "$SMOKE" = 1 ]; then
  echo "(cuDNN skipped in the smoke run: it needs an NVIDIA GPU)"
  run_part "attention (smoke)" 90 "$DIR/attention.log" "$PY" bench/kernels_attention.py --gpu --smoke \
    --seqs 64 --repeats 2 --json "$DIR/attention.json" || FAILED=1
else
  run_part "attention" 120 "$DIR/attention.log" "$PY" bench/kernels_attention.py --gpu --seqs 2048,4096,8192 \
    --repeats 20 --json "$DIR/attention.json" || FAILED=1
fi

echo "== records"
"$PY" bench/gpu_records.py convert "$DIR" || { note "records: FAILED"; FAILED=1; }
"$PY" bench/gpu_records.py summary "$DIR" >"$DIR/summary.txt" || FAILED=1
{ echo; echo "parts:"; printf '  %s\n' "${STATUS[@]}"; echo "total $(( SECONDS - START )) s"; } >>"$DIR/summary.txt"
echo; echo "================ GPU suite summary ================"
cat "$DIR/summary.txt"
if [ -n "$TAR" ]; then
  tar czf "$TAR" -C "$(dirname "$DIR")" "$(basename "$DIR")" && echo "packed $DIR into $TAR"
fi
[ -z "$COPY_SUMMARY" ] || cp "$DIR/summary.txt" "$COPY_SUMMARY"
exit "$FAILED"
