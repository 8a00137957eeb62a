#!/usr/bin/env bash
# Build llama.cpp's tools for the gguf export (llama-quantize, llama-perplexity, llama-bench,
# llama-tokenize) from the llama.cpp source vendored in the llama-cpp-python sdist (fetched from the
# package index with `pip download` when not cached), into ~/.cache/compress/llama.cpp/<version>.
# A no-op when they are built. About 3 minutes on 2 quiet cores. Run inside the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# The system's cmake/ninja where present (what the build was tested with: Debian's cmake 3.25), else
# the pinned wheel of only the missing one, so a machine with cmake but no ninja keeps its cmake.
for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || pip install -c requirements.lock "$tool"
done
if ! command -v c++ >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) || { echo "no C++ compiler: install g++"; exit 1; }
fi
nice -n 10 python -m compress.export.llama_cpp build
