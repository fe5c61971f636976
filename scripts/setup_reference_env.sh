#!/usr/bin/env bash
# Creates .venv-ref with the reference implementations used to generate test fixtures and to
# compare speed (llama.cpp via llama-cpp-python, built from source: ~11 min on 2 cores).
# Not needed to build, run or test detoxfuse.
#
# CPU features come from scripts/llama_cpp_flags.sh: each one only where the CPU lists it, AMX
# always off (these VMs do not grant the AMX permission: SIGILL on the first matrix multiply).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-ref}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="$(scripts/llama_cpp_flags.sh)" \
  "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36" numpy "gguf==0.19.0" "scikit-learn==1.9.1" "alt-profanity-check==1.9.1"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
