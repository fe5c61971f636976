#!/usr/bin/env bash
# The official OpenAI Python client, for the server's integration test (.venv-openai).
# Idempotent: does nothing when the pinned version is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.57.0
if .venv-openai/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
    exit 0
fi
python3 -m venv .venv-openai
.venv-openai/bin/pip install --quiet --disable-pip-version-check "openai==$version"
