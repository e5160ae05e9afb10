"""Full next-token distributions, window by window, in the order of a model's cached records.

The cached records keep the target's log-prob and the top-k only. A fusion rule whose normaliser
sums over the whole vocabulary with a weight that is not the SLM's probability (the cosine rule:
Z = sum_v p_LLM(v) s(v, a)^p) needs the LLM's full distribution at every position; it is too big
to cache (V floats per token), so this pass recomputes it with exactly the scorer's windows and
hands it to a reducer, one window at a time.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.progress import token_progress
from arfuse.scoring.scorer import ScoreConfig, prepare_docs
from arfuse.scoring.windows import plan_windows
from arfuse.data.text import Dataset


@torch.no_grad()
def full_logprob_pass(model: CausalLM, dataset: Dataset, cfg: ScoreConfig,
                      reduce: Callable[[torch.Tensor, torch.Tensor], None], *, progress: bool = True) -> int:
    """Call ``reduce(logp (n, V) float32, targets (n,))`` for every window, in record order.

    Returns the number of targets passed, the same as ``score(model, dataset, cfg)`` holds.
    """
    bos = model.uses_bos(cfg.bos)
    docs = prepare_docs(model, dataset, bos)
    plan = [(d, w) for d, doc in enumerate(docs)
            for w in plan_windows(len(doc.seq), window=cfg.window, stride=cfg.stride, convention=cfg.convention)]
    n = 0
    with token_progress(f"full distributions of {model.info.name} on {dataset.name}",
                        sum(w.n_targets for _, w in plan), enabled=progress) as advance:
        for d, w in plan:
            seq = docs[d].seq
            inp = torch.as_tensor(np.ascontiguousarray(seq[w.ctx_start:w.tgt_end - 1]))[None].to(model.device)
            logits = model.forward_logits_tail(inp, w.n_targets)[0]  # (n_t, V)
            lp = torch.log_softmax(logits.float(), dim=-1).cpu()
            reduce(lp, torch.as_tensor(seq[w.tgt_start:w.tgt_end]).long())
            n += w.n_targets
            advance(w.n_targets)
    return n
