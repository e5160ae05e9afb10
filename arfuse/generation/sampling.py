"""Pure functions that turn a (fused) log-distribution into a token: greedy, or sampling after
temperature, top-k and top-p. Inputs are never modified.

Sampling takes its uniforms from the caller (one per row), so a row's tokens depend only on its
own random stream, never on which other rows share the batch.
"""
from __future__ import annotations

import torch


def transform(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution of ``logp`` (..., V): tempered, cut to the top k and to the top-p
    nucleus, renormalised. Returns log-probs with -inf outside the kept set."""
    out = logp
    if temperature != 1.0:
        out = torch.log_softmax(out / temperature, dim=-1)
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, -torch.inf)
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the top token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, -torch.inf)
    if out is logp:
        return logp
    return torch.log_softmax(out, dim=-1)


def sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from each row of ``logp`` (N, V) with the uniforms ``u`` (N,) in [0, 1)."""
    p = logp.double().exp()
    cdf = torch.cumsum(p, dim=-1)  # (N, V)
    target = (u.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (N, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=logp.shape[-1] - 1)


def residual(logp_target: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log of max(0, P - q) normalised, the distribution to draw from after a rejected draft
    (N, V); where P and q coincide to rounding, P itself."""
    diff = (logp_target.double().exp() - logq.double().exp()).clamp(min=0)  # (N, V)
    total = diff.sum(-1, keepdim=True)
    ok = total > 1e-12
    res = torch.where(ok, diff / total.clamp(min=1e-300), logp_target.double().exp())
    return res.log().float()
