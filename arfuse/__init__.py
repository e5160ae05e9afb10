"""arfuse: fuse a large model with smaller ones at the level of their output distributions."""

__version__ = "0.1.0"
