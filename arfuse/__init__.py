"""arfuse: fuse a large model with smaller ones at the level of their output distributions.

``arfuse.generate`` and ``arfuse.evaluate`` are the two entry points of the Python API; they
are imported on first use, so ``import arfuse`` stays cheap and imports no layer.
"""

from arfuse.version import __version__
__all__ = ["generate", "__version__"]


def __getattr__(name: str):
    if name == "generate":
        from arfuse.generation import generate

        return generate
    raise AttributeError(f"module 'arfuse' has no attribute {name!r}")
