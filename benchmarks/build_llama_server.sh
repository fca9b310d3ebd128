#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp sources vendored in llama-cpp-python's source
# distribution (the same llama.cpp the runtime links), for benchmarks/batching.py's peer
# comparison only: never a runtime dependency. CPU build, no curl; about 10 minutes on 2 cores.
#   bash benchmarks/build_llama_server.sh [OUT_DIR]   -> OUT_DIR/llama-server
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$HOME/.cache/mra-bench/llama-server}
py=.venv/bin/python
version=$($py -c "import llama_cpp; print(llama_cpp.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON > "$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$(nproc)" > "$work/build.log"
mkdir -p "$out"
cp "$work/build/bin/llama-server" "$out/llama-server.partial"
mv "$out/llama-server.partial" "$out/llama-server"   # whole or not at all
echo "$out/llama-server (llama.cpp of llama-cpp-python $version)"
