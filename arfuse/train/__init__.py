"""Small LMs of the paper's recipes (Transformer, LSTM, GRU), their data and training loop,
and self-describing checkpoints that load through ``arfuse.adapters.load_model``."""
from __future__ import annotations

from arfuse.train.config import ARCHS, PRESETS, TrainConfig
from arfuse.train.trainer import TrainResult, train

__all__ = ["ARCHS", "PRESETS", "TrainConfig", "TrainResult", "train", "ensure_demo_slm"]


def ensure_demo_slm(*, progress: bool | None = None, log=print):
    """The demo's King James SLM folder: trained (about 3 minutes on a laptop CPU) and cached
    on first use, returned at once afterwards."""
    from arfuse.train.demo import ensure_demo_slm as _ensure

    return _ensure(progress=progress, log=log)
