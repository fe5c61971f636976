#!/usr/bin/env bash
# Creates .venv-ref with the reference implementations used to generate test fixtures and to
# compare speed (llama.cpp via llama-cpp-python, built from source: ~11 min on 2 cores).
# Not needed to build, run or test detoxfuse.
#
# AMX is switched off explicitly: llama.cpp's native build enables AMX tiles on CPUs that
# advertise them, but this VM does not grant the AMX permission and the process dies with
# SIGILL (tilezero) on the first matrix multiply.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-ref}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON \
 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  "$VENV/bin/pip" install -q --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==0.3.36" numpy "gguf==0.19.0" "scikit-learn==1.9.1" "alt-profanity-check==1.9.1"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
