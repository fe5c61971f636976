#!/usr/bin/env bash
# Side-by-side serving benchmark (docs/SERVER.md): llama.cpp's llama-server
# (scripts/build_llama_server.sh) and `detoxfuse serve`, same GGUF, same threads, same prompt,
# max_tokens and sampling, driven by the same load generator (`detoxfuse bench serve`), one
# cell after another in one process so that the ratios compare. Prints one table.
#
#   REQUESTS (per cell, 48), MAX_TOKENS (32), CONCURRENCY (1,4,16), ALPHAS (0,0.2),
#   PARALLEL (llama-server slots, 16), MODEL (smollm2), PORT (llama-server's, 18081)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-48}
MAX_TOKENS=${MAX_TOKENS:-32}
CONCURRENCY=${CONCURRENCY:-1,4,16}
ALPHAS=${ALPHAS:-0,0.2}
PARALLEL=${PARALLEL:-16}
MODEL=${MODEL:-smollm2}
THREADS=$(nproc)
[ -x .reference/llama-server ] || scripts/build_llama_server.sh
cargo build --release -q
BIN=target/release/detoxfuse
GGUF=$($BIN fetch "$MODEL" | cut -f2)
PORT=${PORT:-18081}
# Context per slot: llama-server splits -c among its slots.
.reference/llama-server -m "$GGUF" -t "$THREADS" -tb "$THREADS" --parallel "$PARALLEL" \
  -c $((PARALLEL * 512)) --host 127.0.0.1 --port "$PORT" --no-webui > /tmp/llama-server.log 2>&1 &
LLAMA=$!
trap 'kill $LLAMA 2>/dev/null || true' EXIT
up=0
for _ in $(seq 120); do
  if curl -fs "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; then up=1; break; fi
  kill -0 $LLAMA 2>/dev/null || break
  sleep 0.5
done
if [ "$up" != 1 ]; then
  echo "llama-server did not come up on port $PORT (busy port? set PORT=…); its log:" >&2
  tail -20 /tmp/llama-server.log >&2
  exit 1
fi
echo "llama-server $(.reference/llama-server --version 2>&1 | head -1), $THREADS threads, $PARALLEL slots; detoxfuse $(git rev-parse --short HEAD)"
$BIN bench serve --url "llama-server=http://127.0.0.1:$PORT" --model "$MODEL" \
  --requests "$REQUESTS" --concurrency "$CONCURRENCY" --alpha "$ALPHAS" --max-tokens "$MAX_TOKENS" \
  --queue 64 --max-batch 32
