"""`make test` installs the optional extras so that their tests run for real. In CI a missing
extra must fail here, loudly, instead of letting its tests skip themselves into a green run."""
import pytest

from conftest import require_extra

EXTRAS = {  # module -> the extra of pyproject.toml that installs it
    "lm_eval": "lm-eval",
    "fastapi": "serve",
    "uvicorn": "serve",
    "openai": "test",
    "ray": "ray",
    "llama_cpp": "llamacpp",
}


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_extra_is_installed_in_ci(module):
    assert require_extra(module, EXTRAS[module]).__name__ == module


def test_llama_cpp_is_built_without_llamafile():
    """`make extras` builds llama.cpp without llamafile: its sgemm serves batches of two or more tokens only,
    so a one-token step would differ from a full pass, and the adapter's exact default (steps="auto") would
    fall back to running lone tokens as batches of two (about 1.4x slower). pip may reuse a wheel it built
    with other flags; the Makefile then rebuilds it."""
    llama_cpp = require_extra("llama_cpp", "llamacpp")
    info = llama_cpp.llama_print_system_info().decode()
    assert "LLAMAFILE = 1" not in info, (
        "llama-cpp-python was built with llamafile; rebuild it as the Makefile does: CMAKE_ARGS='... "
        "-DGGML_LLAMAFILE=OFF' pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36")
