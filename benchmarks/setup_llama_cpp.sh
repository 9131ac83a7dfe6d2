#!/usr/bin/env bash
# llama.cpp's own tools for bench_quant.py (once, ~30 minutes on 2 cores): its converter
# (convert_hf_to_gguf.py, from the llama-cpp-python source distribution, which vendors llama.cpp)
# in .bench/convert-env with the versions it pins, and llama-quantize built from the same sources.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
mkdir -p .bench
if [ ! -d .bench/llama.cpp ]; then
  pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d .bench/sdist
  tar xzf ".bench/sdist/llama_cpp_python-$version.tar.gz" -C .bench/sdist
  mv ".bench/sdist/llama_cpp_python-$version/vendor/llama.cpp" .bench/llama.cpp
fi
if [ ! -x .bench/convert-env/bin/python ]; then
  python -m venv --system-site-packages .bench/convert-env
  .bench/convert-env/bin/pip install -q "transformers==4.57.6" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0"
fi
if [ ! -x .bench/llama.cpp-build/bin/llama-quantize ]; then
  cmake -S .bench/llama.cpp -B .bench/llama.cpp-build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build .bench/llama.cpp-build --target llama-quantize -j"$(nproc)"
fi
echo "llama.cpp tools ready: .bench/llama.cpp (converter), .bench/llama.cpp-build/bin/llama-quantize"
