"""The Accept-Reject linear mixture and its plain baselines.

AR fusion (the paper's eq. 4): P = sum_i w_i p_i with sum_i w_i = 1; for two models
P = w p_LLM + (1 - w) p_SLM and the weight ratio k = w / (1 - w). Computed in log space as
logsumexp_i(log w_i + log p_i), so tiny probabilities never underflow.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Rule, check_weights

Array = np.ndarray | torch.Tensor


def w_to_k(w: float) -> float:
    """The weight ratio k = w / (1 - w) (inf at w = 1)."""
    return math.inf if w >= 1.0 else w / (1.0 - w)


def k_to_w(k: float) -> float:
    """The LLM weight w = k / (1 + k) of a weight ratio k >= 0."""
    if k < 0 or math.isnan(k):
        raise ArfuseError(f"weight ratio k = {k} must be >= 0")
    return 1.0 if math.isinf(k) else k / (1.0 + k)


def _stack(logps: Sequence[Array]):
    if isinstance(logps[0], torch.Tensor):
        return torch, torch.stack(list(logps), dim=0)
    return np, np.stack([np.asarray(x) for x in logps], axis=0)


def linear(logps: Sequence[Array], weights: Sequence[float]) -> Array:
    """log(sum_i w_i exp(logps[i])): the AR mixture of K log-distributions (or of log p(target)).

    A weight of exactly 1 returns that model's log-probs unchanged (a copy), bit for bit.
    """
    ws = check_weights(weights, len(logps))
    for i, w in enumerate(ws):
        if w == 1.0:
            x = logps[i]
            return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)
    logw = [math.log(w) if w > 0 else -math.inf for w in ws]
    if isinstance(logps[0], torch.Tensor):
        # pairwise logaddexp: several times faster than a logsumexp over a stacked copy on the wide
        # rows a decoding step fuses, and no (K, ..., V) temporary
        out = logps[0] + logw[0]
        for x, lw in zip(logps[1:], logw[1:]):
            out = torch.logaddexp(out, x + lw)
        return out
    xp, stacked = _stack(logps)  # (K, ...)
    lw = np.asarray(logw, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    z = stacked + lw
    m = np.max(z, axis=0)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m_safe + np.log(np.sum(np.exp(z - m_safe), axis=0))


def uniform(logps: Sequence[Array]) -> Array:
    """The plain average of K distributions (the equal-weight ensemble baseline)."""
    return linear(logps, [1.0 / len(logps)] * len(logps))


def logprob_average(logps: Sequence[Array], weights: Sequence[float] | None = None) -> Array:
    """Renormalised weighted geometric mean: log_softmax(sum_i w_i log p_i) over the last axis.

    Needs full distributions (the last axis is the vocabulary), unlike ``linear``. A model of weight 0
    is left out (so its -inf log-probs never meet 0 * -inf).
    """
    ws = check_weights(weights if weights is not None else [1.0 / len(logps)] * len(logps), len(logps))
    logps, ws = [x for x, w in zip(logps, ws) if w > 0], [w for w in ws if w > 0]
    xp, stacked = _stack(logps)
    if xp is torch:
        w = torch.tensor(ws, dtype=stacked.dtype, device=stacked.device).reshape((-1,) + (1,) * (stacked.dim() - 1))
        return torch.log_softmax((stacked * w).sum(0), dim=-1)
    w = np.asarray(ws, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    s = (stacked * w).sum(0)
    m = s.max(axis=-1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=-1, keepdims=True))


class LinearRule(Rule):
    """P = sum_i w_i p_i: the Accept-Reject mixture, the LLM first."""

    name = "linear"
    paper = "Accept-Reject fusion (the AR paper, eq. 4)"
    summary = "P = w p_LLM + (1 - w) p_SLM, the AR mixture (K models: weights on the simplex)"
    inputs = "target"   # the mixture of log p(target) is the fused log p(target): cached records suffice
    min_models = 1      # one model with weight 1 is the LLM alone

    def __call__(self, logps):
        if self.weights is None:
            raise ArfuseError("the linear rule needs its weights: give the LLM's weight w (--weight, e.g. 0.9; "
                              "`arfuse eval` finds the best one) or one weight per model (--weights)")
        return linear(logps, self.weights)
