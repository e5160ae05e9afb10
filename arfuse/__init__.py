"""arfuse: fuse a large model with smaller ones at the level of their output distributions.

``arfuse.generate`` and ``arfuse.evaluate`` are the two entry points of the Python API; they
are imported on first use, so ``import arfuse`` stays cheap and imports no layer.
"""

from arfuse.version import __version__
__all__ = ["generate", "evaluate", "EvalConfig", "__version__"]


def __getattr__(name: str):
    if name == "generate":
        from arfuse.generation import generate

        return generate
    if name in ("evaluate", "EvalConfig"):
        import arfuse.tasks

        return getattr(arfuse.tasks, name)
    raise AttributeError(f"module 'arfuse' has no attribute {name!r}")
