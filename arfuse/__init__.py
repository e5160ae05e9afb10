"""arfuse: fuse a large model with smaller ones at the level of their output distributions."""

__version__ = "0.1.0"
from arfuse.generation import generate  # noqa: E402,F401  (lazy: torch loads on first call)
