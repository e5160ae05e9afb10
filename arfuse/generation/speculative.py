"""Verification of drafted tokens against a target distribution (pure functions).

A draft x drawn from q is accepted with probability min(1, P(x) / q(x)); on the first rejection
the next token is drawn from max(0, P - q) normalised; when every draft is accepted the bonus token
is drawn from P at the position after them. The tokens that come out follow P exactly
(Leviathan et al. 2023, Chen et al. 2023), whatever q is. Here P is the fused distribution
(after temperature, top-k and top-p), and q the draft model's own sampling distribution. In
greedy mode a draft is accepted while it equals the argmax of P.
"""
from __future__ import annotations

import torch


def accepted_counts(draft: torch.Tensor, logq: torch.Tensor, logp: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """How many leading drafts each row accepts: draft (B, g), logq and logp (B, g, V), u (B, g)
    uniforms (None for greedy). Returns (B,) long in [0, g]."""
    if draft.shape[1] == 0:
        return torch.zeros(draft.shape[0], dtype=torch.long)
    idx = draft.unsqueeze(-1).to(logp.device)
    if u is None:
        ok = logp.argmax(-1) == draft.to(logp.device)  # (B, g)
    else:
        ratio = (logp.gather(-1, idx) - logq.gather(-1, idx)).squeeze(-1).double()  # log P(x)/q(x), (B, g)
        ok = u.double().to(ratio.device).log() < ratio
    return torch.cumprod(ok.long(), dim=1).sum(1).cpu()
