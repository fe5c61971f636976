#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the sources inside the llama-cpp-python==0.3.36 sdist
# (vendor/llama.cpp), for the side-by-side serving benchmark in docs/SERVER.md. CPU features
# come from scripts/llama_cpp_flags.sh (AMX off). Result: .reference/llama-server.
# About 10 minutes on 2 cores; not needed to build, run or test detoxfuse.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.reference
mkdir -p "$OUT"
if [ ! -x "$OUT/venv/bin/cmake" ]; then
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q "cmake==3.31.6" "ninja==1.11.1.4"
fi
if [ ! -d "$OUT/src" ]; then
  # The sdist itself, from PyPI's simple index (pip download would first build the sdist's
  # build dependencies from source), checked against the sha256 the index gives for it.
  mkdir -p "$OUT/sdist" "$OUT/src"
  link=$(curl -fsS https://pypi.org/simple/llama-cpp-python/ | grep -o 'https://[^"]*/llama_cpp_python-0\.3\.36\.tar\.gz#sha256=[0-9a-f]*' | head -1)
  [ -n "$link" ] || { echo "llama-cpp-python 0.3.36's sdist is not on PyPI's index" >&2; exit 1; }
  curl -fsSL "${link%%#*}" -o "$OUT/sdist/llama-cpp-python-0.3.36.tar.gz"
  echo "${link##*sha256=}  $OUT/sdist/llama-cpp-python-0.3.36.tar.gz" | sha256sum -c -
  tar -xzf "$OUT/sdist/llama-cpp-python-0.3.36.tar.gz" -C "$OUT/src" --strip-components=1
fi
FLAGS=$(scripts/llama_cpp_flags.sh)
echo "llama.cpp CPU flags: $FLAGS"
# shellcheck disable=SC2086
"$OUT/venv/bin/cmake" -S "$OUT/src/vendor/llama.cpp" -B "$OUT/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$PWD/$OUT/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF $FLAGS
"$OUT/venv/bin/cmake" --build "$OUT/build" --target llama-server -j "$(nproc)"
cp "$OUT/build/bin/llama-server" "$OUT/llama-server"
"$OUT/llama-server" --version
