"""The demo's small model: a 2-layer GPT-2 on SmolLM2's tokenizer, trained for about three
minutes of this project's 2-core CPU (131K tokens) on the first 90% of the King James Bible,
and cached. It is the acceptance model's recipe (configs/kjv-slm.toml) on a 64-step schedule.

Trained once per recipe into ``<cache>/slm/demo-kjv-<hash>``; an interrupted training
resumes on the next call. The recipe departs from the paper's (a 6-layer model at lr 5e-5
for 3 epochs: days on a CPU) in size, learning rate and length: docs/training.md says how.
"""
from __future__ import annotations

from pathlib import Path

from arfuse.adapters.base import fingerprint_json
from arfuse.paths import cache_root

DEMO_RECIPE = dict(
    arch="transformer", family="gpt2", tokenizer="smollm2-135m",
    data="kjv[:90%]", valid="kjv[90%:90.5%]",        # the demo chooses the weight on kjv[90%:90.5%] too
    n_layers=2, n_heads=4, embed_size=256, ffn_size=1024, block_size=1024, dropout=0.0,
    batch_size=2, grad_accum=1, max_steps=64, lr=3e-3, min_lr=3e-4, warmup=0.1, schedule="cosine",
    eval_every=32, threads=1, seed=42,
)


def demo_folder() -> Path:
    """Where the demo SLM lives: keyed by its recipe, so a changed recipe trains a new model."""
    return cache_root() / "slm" / f"demo-kjv-{fingerprint_json(DEMO_RECIPE)[:10]}"


def ensure_demo_slm(*, progress: bool | None = None, log=print) -> Path:
    """The demo SLM's folder, training it first when it is not in the cache yet."""
    from arfuse.train.checkpoint import read_meta
    from arfuse.train.config import TrainConfig
    from arfuse.train.trainer import train

    out = demo_folder()
    meta = read_meta(out)
    if meta is not None and meta.get("status") == "complete":
        return out
    log(f"training the demo SLM once (about 3 minutes on a 2-core CPU); cached in {out}")
    cfg = TrainConfig.resolve({**DEMO_RECIPE, "out": str(out)})
    return train(cfg, progress=progress, log=log).path
