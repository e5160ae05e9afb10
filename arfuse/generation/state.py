"""One model's incremental decoding state, as generation sees it: feed new tokens, take back
drafts it has seen (speculative decoding), drop finished rows.

Each step runs the model only on tokens it has not seen (``CausalLM.forward_step``); the model's
``StepState`` rolls itself back and selects its own rows (``arfuse.adapters.base``), so a row's
results never depend on the others. A model without a cache reruns its rows' whole sequences.
"""
from __future__ import annotations

import torch

from arfuse.adapters.base import CausalLM, StepState


class ModelState:
    """Feed new tokens, get their float32 next-token log-probs; roll back; select rows."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.past: StepState | None = None
        self.fed = 0                               # model calls, for statistics

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs (B, T, V) after each of the new tokens ``ids`` (B, T); ``mask`` marks real ones."""
        self.fed += 1
        logits, self.past = self.model.forward_step(ids, self.past, mask)
        return torch.log_softmax(logits.float(), dim=-1)

    def start(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        """Begin ``feed`` without waiting, where the model can (``forward_step_start``: a model in
        another process); None where it cannot."""
        begin = getattr(self.model, "forward_step_start", None)
        if begin is None:
            return None
        self.fed += 1
        return begin(ids, self.past, mask)

    def finish(self, handle) -> torch.Tensor:
        """The log-probs of a step ``start`` began."""
        logits, self.past = self.model.forward_step_finish(handle)
        return torch.log_softmax(logits.float(), dim=-1)

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        """Of the last ``n_fed`` tokens fed, row b keeps the first ``keep[b]``; the rest are forgotten."""
        if self.past is not None:
            self.past.rollback(n_fed, keep.cpu())

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (1-D long), in that order."""
        if self.past is not None:
            self.past.select(rows)

    def concat(self, other: ModelState, n_self: int, n_other: int) -> None:
        """Append the ``n_other`` rows of ``other`` (the same model's state of another batch) after
        this state's ``n_self`` rows (continuous batching: new requests join a running batch)."""
        if other.model is not self.model:
            raise ValueError("states of different models cannot be joined")
        if self.past is None:
            if n_self:   # rows that have seen nothing, ahead of rows that have: not needed by any caller
                raise ValueError("join the new rows into a state that has seen tokens, or an empty batch")
            self.past = other.past
        elif other.past is not None or n_other:
            self.past.concat(other.past, n_other)


def feed_all(states: list[ModelState], ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[st.feed(ids, mask) for st in states]``, but the steps of models held elsewhere (Ray actors)
    are all sent before any is waited for, and in-process models run meanwhile: the same results."""
    handles = [st.start(ids, mask) for st in states]
    return [st.feed(ids, mask) if h is None else st.finish(h) for st, h in zip(states, handles)]


def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each sequence but its last token, left-padded to the longest: ids (B, W) and the mask of real
    tokens (B, W); None when no sequence has more than one token (nothing to feed before the last)."""
    width = max(len(s) - 1 for s in seqs)
    if not width:
        return None
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        if n:
            ids[b, width - n:] = torch.tensor(s[:-1])
            mask[b, width - n:] = True
    return ids, mask
