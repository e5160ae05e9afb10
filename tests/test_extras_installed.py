"""`make test` installs the optional extras so that their tests run for real. In CI a missing
extra must fail here, loudly, instead of letting its tests skip themselves into a green run."""
import importlib
import os

import pytest

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
    try:
        importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing in CI: `make test` installs the extra "
                        f"{EXTRAS[module]!r} (pip install -e '.[{EXTRAS[module]}]'): {e}")
        pytest.skip(f"{module} not installed (pip install -e '.[{EXTRAS[module]}]')")
