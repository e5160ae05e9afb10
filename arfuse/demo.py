"""The embedded default job of `make demo` / `arfuse demo`.

SmolLM2-135M-Instruct (the LLM, never touched) fused with a small Transformer that arfuse
trains on the first 90% of the King James Bible (the paper's Table 2 setting: domain
adaptation by a small model). The fusion weight is chosen on one part of the held-out 10%
and the gain is reported on another, disjoint part.
"""
from __future__ import annotations

from arfuse.scoring.scorer import ScoreConfig

LARGE = "smollm2-135m"
VALID = "kjv[90%:90.5%]"     # choose the weight here ...
TEST = "kjv[95%:96.5%]"      # ... and report here: both inside the held-out 10%, disjoint
SCORE = ScoreConfig(window=1024, stride=1024, convention="blocks", bos="never", topk=32)


def run_demo(*, progress: bool = True, device: str = "cpu"):
    """Train (or reuse) the demo SLM, then evaluate the fusion; returns the EvalReport."""
    from arfuse.tasks.config import EvalConfig
    from arfuse.tasks.heads import evaluate
    from arfuse.train import ensure_demo_slm

    small = ensure_demo_slm(progress=progress)
    cfg = EvalConfig(large=LARGE, smalls=[str(small)], data=TEST, valid=VALID, score=SCORE, device=device)
    return evaluate(cfg, progress=progress)
