#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the sources vendored in the llama-cpp-python sdist
# (PyPI), the peer bench/serve.py compares Baton with. Prints the binary's path.
#   bench/build_llama_server.sh [workdir]        (about 25 minutes on 2 cores)
set -euo pipefail
work="${1:-/tmp/llama-server-build}"
mkdir -p "$work" && cd "$work"
python3 -m pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d . >/dev/null
tar xzf llama_cpp_python-0.3.36.tar.gz
cd llama_cpp_python-0.3.36/vendor/llama.cpp
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >/dev/null
cmake --build build --target llama-server -j "$(nproc)" >/dev/null
echo "$PWD/build/bin/llama-server"
