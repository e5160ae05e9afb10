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
