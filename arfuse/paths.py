"""Where arfuse finds shared data and keeps its cache."""
from __future__ import annotations

import os
from pathlib import Path

_PKG_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """The on-disk cache: $ARFUSE_CACHE, else ~/.cache/arfuse."""
    root = os.environ.get("ARFUSE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "arfuse"


def shared_data_root() -> Path | None:
    """The offline data folder: $ARFUSE_DATA, else ../shared/data beside the checkout or the cwd."""
    env = os.environ.get("ARFUSE_DATA")
    if env:
        return Path(env).expanduser()
    for base in (_PKG_ROOT, Path.cwd()):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None
