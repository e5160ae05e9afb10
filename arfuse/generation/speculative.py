"""Verification of drafted tokens against a target distribution (pure functions).

A draft x drawn from q is accepted with probability min(1, P(x) / q(x)); on the first rejection
the next token is drawn from max(0, P - q) normalised; when every draft is accepted the bonus token
is drawn from P at the position after them. The tokens that come out follow P exactly
(Leviathan et al. 2023, Chen et al. 2023), whatever q is. Here P is the fused distribution
(after temperature, top-k and top-p), and q the draft model's own sampling distribution. In
greedy mode a draft is accepted while it equals the argmax of P.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def accepted_counts(draft: torch.Tensor, logq: torch.Tensor, logp: torch.Tensor, u: torch.Tensor | None,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """How many leading drafts each row accepts: draft (B, g), logq and logp (B, g, V), u (B, g)
    uniforms (None for greedy), valid (B, g) False at padding (never accepted). Returns (B,) long
    in [0, g]."""
    if draft.shape[1] == 0:
        return torch.zeros(draft.shape[0], dtype=torch.long)
    idx = draft.unsqueeze(-1).to(logp.device)
    if u is None:
        ok = logp.argmax(-1) == draft.to(logp.device)  # (B, g)
    else:
        ratio = (logp.gather(-1, idx) - logq.gather(-1, idx)).squeeze(-1).double()  # log P(x)/q(x), (B, g)
        ok = u.double().to(ratio.device).log() < ratio
    if valid is not None:
        ok = ok & valid.to(ok.device)
    return torch.cumprod(ok.long(), dim=1).sum(1).cpu()


def lookup_draft(seq: Sequence[int], g: int, max_ngram: int = 3) -> list[int]:
    """Up to ``g`` draft tokens copied from ``seq`` itself: the tokens that followed the most recent
    earlier occurrence of its last n tokens (n = max_ngram, ..., 1; the longest match wins).
    [] when the last token never occurred before. Text repeats itself (names, refrains, verse
    formulas), and such drafts cost no model step (prompt-lookup decoding, Saxena 2023)."""
    return lookup_match(seq, g, max_ngram)[0]


def lookup_match(seq: Sequence[int], g: int, max_ngram: int = 3) -> tuple[list[int], int]:
    """``lookup_draft``'s tokens and the length n of the matched n-gram (0: no match)."""
    n_seq = len(seq)
    for n in range(min(max_ngram, n_seq - 1), 0, -1):
        key = list(seq[n_seq - n:])
        for j in range(n_seq - n - 1, -1, -1):
            if list(seq[j:j + n]) == key:
                return list(seq[j + n:j + n + g]), n
    return [], 0
