#!/usr/bin/env bash
# lm-evaluation-harness against `polychip serve`: its `local-completions` model with default
# settings (remote tokenizer through /tokenizer_info + /tokenize, token-id prompts, echo+logprobs
# for log-likelihoods) on two tiny tasks shipped in bench/lm_eval_tasks/ (no hub download).
#
#   bench/lm_eval_smoke.sh [CHECKPOINT]
#
# CHECKPOINT: a `polychip train --out` folder or an HF folder (default: a tiny model trained here
# for 30 steps into $TMPDIR). lm-eval lives in its own venv, never a polychip dependency:
#   LMEVAL_VENV (default /work/lmeval-venv): python3.11 -m venv $LMEVAL_VENV && $LMEVAL_VENV/bin/pip install "lm_eval[api]"
# POLYCHIP (default: `polychip` on PATH) runs the server; LMEVAL_OUT keeps lm-eval's results and samples.
set -euo pipefail
cd "$(dirname "$0")/.."
LMEVAL_VENV=${LMEVAL_VENV:-/work/lmeval-venv}
POLYCHIP=${POLYCHIP:-polychip}
PORT=${PORT:-8765}
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT

CKPT=${1:-}
if [ -z "$CKPT" ]; then
  CKPT=$WORK/tiny
  echo "== training a tiny model into $CKPT"
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} $POLYCHIP train --preset tiny --out "$CKPT" train.steps=30 \
    data.max_bytes=300000 mesh.num_devices=1 > "$WORK/train.log" 2>&1
fi

echo "== polychip serve on 127.0.0.1:$PORT"
JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} $POLYCHIP serve --checkpoint "$CKPT" --port "$PORT" --model-name tiny \
  --max-batch 4 --prefill-chunk 64 > "$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.5
done

echo "== lm_eval local-completions (defaults) on polychip_tiny_choice, polychip_tiny_gen"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$LMEVAL_VENV/bin/lm_eval" --model local-completions \
  --model_args "model=tiny,base_url=http://127.0.0.1:$PORT/v1/completions" \
  --include_path bench/lm_eval_tasks --tasks polychip_tiny_choice,polychip_tiny_gen \
  --output_path "${LMEVAL_OUT:-$WORK/out}" --log_samples
echo "== served requests: $(curl -s "http://127.0.0.1:$PORT/metrics" | grep '^polychip:request_success_total' | tr '\n' ' ')"
