"""Generation from a fused model: greedy, sampling and speculative decoding, batched and streaming.

    >>> import arfuse
    >>> arfuse.generate("Once upon a time", large="smollm2-135m", small="my-slm", weight=0.9,
    ...                 max_new_tokens=32, speculative="auto").text

Importing this package is cheap (torch loads on first use), so ``import arfuse`` stays fast.
"""
from __future__ import annotations

_LAZY = {
    "Stream": "api", "build_rule": "api",
    "GenerationConfig": "config", "GenerationResult": "decode", "GenerationStats": "decode", "Chunk": "decode",
    "Decoder": "decode",
}
__all__ = ["generate", *_LAZY]


def generate(prompt, **kwargs):
    """Generate from the fused model; see ``arfuse.generation.api.generate`` for every option."""
    from arfuse.generation.api import generate as _generate

    return _generate(prompt, **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"arfuse.generation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'arfuse.generation' has no attribute {name!r}")
