"""Full next-token distributions, window by window, in the order of a model's cached records.

The cached records keep the target's log-prob and the top-k only. A fusion rule whose normaliser
sums over the whole vocabulary with a weight that is not the SLM's probability (the cosine rule:
Z = sum_v p_LLM(v) s(v, a)^p; any rule other than the linear mixture) needs full distributions at
every position; they are too big to cache (V floats per token), so this pass recomputes them with
exactly the scorer's windows, one window at a time: ``full_windows`` yields them (several models'
streams zip window by window).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.scoring.scorer import ScoreConfig, prefix_token, prepare_docs
from arfuse.scoring.windows import plan_windows
from arfuse.data.text import Dataset


class FullWindows:
    """The scorer's windows of ``dataset`` for ``model``; iterating runs them and yields
    ``(logp (n, V) float32 on the CPU, targets (n,))`` per window, in record order."""

    def __init__(self, model: CausalLM, dataset: Dataset, cfg: ScoreConfig):
        self.model = model
        self.docs = prepare_docs(model, dataset, model.uses_bos(cfg.bos), prefix_token(model, cfg))
        self.plan = [(d, w) for d, doc in enumerate(self.docs)
                     for w in plan_windows(len(doc.seq), window=cfg.window, stride=cfg.stride,
                                           convention=cfg.convention)]
        self.n_targets = sum(w.n_targets for _, w in self.plan)  # as many as score(model, dataset, cfg) holds

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        m = self.model
        for d, w in self.plan:
            seq = self.docs[d].seq
            inp = torch.as_tensor(np.ascontiguousarray(seq[w.ctx_start:w.tgt_end - 1]))[None].to(m.device)
            logits = m.forward_logits_tail(inp, w.n_targets)[0]  # (n_t, V)
            yield torch.log_softmax(logits.float(), dim=-1).cpu(), torch.as_tensor(seq[w.tgt_start:w.tgt_end]).long()


def full_windows(model: CausalLM, dataset: Dataset, cfg: ScoreConfig) -> FullWindows:
    """The full-distribution windows of ``model`` on ``dataset`` (run when iterated)."""
    return FullWindows(model, dataset, cfg)
