"""The drafter's output layer, restricted to likely tokens while it drafts.

A small model's step is mostly its output layer: a 2-layer SLM of width 256 on a 49,152-token
vocabulary spends most of a step multiplying by its 49,152 x 256 head. Drafting only needs a
guess of the next token, so while the SLM drafts, its head scores a candidate set C of tokens (per
row: the 4,096 most probable over its prompt, and the top 32 of every exact distribution on its
text since: a few thousand tokens), and the exact head runs once per cycle, on every drafted
position together, for P. A cycle with one draft runs the whole head once anyway and keeps it. Each row has
its own set, built from its own distributions only, so a row's drafts and tokens never depend on
the other rows of a batch (the product runs over the union of the sets; each row's logits outside
its own set are masked). A row with no distribution seen yet (a
one-token prompt) drafts from its whole vocabulary until it has one.

Drafts are drawn from q_C, the SLM's distribution renormalised on C. Speculative verification is
exact for any draft distribution (the acceptance test and the residual use q_C itself), so the
output is exactly the fused model's; only the acceptance rate can change, when the SLM's own best
token lies outside C; ``GenerationStats.draft_head_coverage`` reports how often its exact argmax
was in C, and benchmarks/bench_generate.py measures drafting time per cycle with and without the
candidate head. Where drafts are accepted rarely, verification dominates and the saving is small.

Only an output layer that is a plain ``nn.Linear`` whose output is the model's logits qualifies
(``CausalLM.output_layer``; its product is replaced through ``CausalLM.output_replaced``): a probe
on two tokens compares them (soft-capped or scaled logits fail it), and any other model drafts with
its whole head.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from arfuse.adapters.base import CausalLM

TOP_K = 32          # each exact distribution's best tokens join its row's set
PRIOR = 4096        # a row's first distributions: their most probable tokens join its set


class DraftHead:
    """Per-row candidate sets of one model's vocabulary, and its output layer restricted to them."""

    def __init__(self, model: CausalLM, lin: torch.nn.Linear, top_k: int | None = None, prior: int | None = None):
        self.model = model
        self.lin = lin
        self.vocab = lin.out_features
        self.top_k = min(TOP_K if top_k is None else top_k, self.vocab)
        self.prior = min(PRIOR if prior is None else prior, self.vocab)
        self.rows: torch.Tensor | None = None   # (B, V) bool: each row's set (all True before its first distribution)
        self.seen: torch.Tensor | None = None   # (B,) bool: the row has had a distribution
        self.union = torch.zeros(self.vocab, dtype=torch.bool)
        self.idx = torch.zeros(0, dtype=torch.long)   # the union's tokens, in the order of ``w``
        self.w = lin.weight.new_zeros(0, lin.in_features)
        self.b = None if lin.bias is None else lin.bias.new_zeros(0)
        self._mask: torch.Tensor | None = None  # (B, |union|): False where a token is not in the row's set
        self.hidden: list[torch.Tensor] = []
        self.covered = 0      # drafted positions whose exact best token was in the row's set
        self.positions = 0

    @classmethod
    def for_model(cls, model: CausalLM, shared_rows_once: bool = False) -> DraftHead | None:
        """A DraftHead for ``model`` if its logits are exactly its output layer applied to the last
        hidden state (a probe on two tokens), else None. None too with ``shared_rows_once`` (the
        generation kernels are on) for a layer whose repeated rows those kernels compute once (a
        compact-vocabulary SLM from ``arfuse train``): its whole head is cheap already, and
        candidates only added work in bench_generate's runs."""
        lin = model.output_layer()
        if type(lin) is not torch.nn.Linear:
            return None
        if shared_rows_once and model.fast_kernels().shared_rows(lin) is not None:
            return None
        head = cls(model, lin)
        ids = torch.tensor([[model.bos_id if model.bos_id is not None else 0, 1]], device=lin.weight.device)
        with torch.no_grad(), head._capture(lambda x: F.linear(x, lin.weight, lin.bias)):
            try:
                logits = model.forward_logits(ids)
            except Exception:  # an unusual forward: keep the whole head
                return None
        if len(head.hidden) != 1:
            return None
        ref = F.linear(head.hidden.pop(), lin.weight, lin.bias)
        if logits.shape != ref.shape or not torch.allclose(logits.float(), ref.float(), rtol=1e-4, atol=1e-4):
            return None
        return head

    # ---- the candidate sets ---------------------------------------------------------------
    @property
    def size(self) -> int:
        """Tokens in the union of the rows' sets."""
        return int(self.idx.numel())

    def start(self, batch: int) -> None:
        self.rows = torch.ones(batch, self.vocab, dtype=torch.bool)
        self.seen = torch.zeros(batch, dtype=torch.bool)
        self._grow(self.rows.any(0))

    def observe(self, per_row) -> None:
        """Exact log-probs of the model, one (T_b, V) tensor per row (T_b may be 0): their top tokens
        join the row's set (with a row's first distributions, also their PRIOR most probable tokens)."""
        rebuild = False
        for b, lp in enumerate(per_row):
            if lp is None or not lp.shape[0]:
                continue
            lp = lp.reshape(-1, self.vocab)
            ids = [torch.topk(lp, self.top_k, dim=-1).indices.reshape(-1)]
            if not self.seen[b]:
                ids.append(torch.topk(torch.logsumexp(lp, 0), self.prior).indices)
                self.rows[b] = False
                self.seen[b] = True
                rebuild = True
            self.rows[b, torch.cat(ids).cpu()] = True
        if rebuild:  # a row left its whole vocabulary: the union may shrink
            self.union = torch.zeros(self.vocab, dtype=torch.bool)
            self.idx = self.idx[:0]
            self.w = self.w[:0]
            self.b = None if self.b is None else self.b[:0]
        self._grow(self.rows.any(0))

    def _grow(self, wanted: torch.Tensor) -> None:
        new = torch.nonzero(wanted & ~self.union).squeeze(-1)
        if new.numel():
            self.union[new] = True
            self.idx = torch.cat([self.idx, new])
            dev = self.lin.weight.device
            self.w = torch.cat([self.w, self.lin.weight.detach()[new.to(dev)]])
            if self.b is not None:
                self.b = torch.cat([self.b, self.lin.bias.detach()[new.to(dev)]])
        self._mask = self.rows[:, self.idx].to(self.lin.weight.device)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep`` (1-D long), in that order."""
        self.rows, self.seen = self.rows[keep], self.seen[keep]
        self._mask = self._mask[keep.to(self._mask.device)]

    def count_coverage(self, exact_logp: torch.Tensor, n: torch.Tensor) -> None:
        """Of the drafted positions on each row's text (the first n_b + 1 of row b, at most g), how
        many had their exact best token in the row's set."""
        B, g = exact_logp.shape[:2]
        best = exact_logp.argmax(-1).cpu()  # (B, g)
        on_text = torch.arange(g)[None, :] <= n[:, None]
        inside = self.rows.gather(1, best)
        self.covered += int((inside & on_text).sum())
        self.positions += int(on_text.sum())

    # ---- drafting -------------------------------------------------------------------------
    def _capture(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        """While inside, the model's output layer keeps its inputs (the hidden states) and returns fn(x)."""
        def forward(x):
            self.hidden.append(x.detach())
            return fn(x)

        return self.model.output_replaced(forward)

    def drafting(self):
        """While inside, the model's logits (B, T, |union|) cover the union of the rows' sets, in the
        order of ``idx``, -inf outside each row's own set; the hidden states are kept for ``exact``."""
        def restricted(x):
            mask = self._mask.reshape(self._mask.shape[0], *([1] * (x.dim() - 2)), -1)
            return F.linear(x, self.w, self.b).masked_fill(~mask, -torch.inf)
        return self._capture(restricted)

    def spread(self, logp_c: torch.Tensor) -> torch.Tensor:
        """Log-probs over the union (B, |union|) as log-probs over the vocabulary, -inf outside."""
        out = logp_c.new_full((*logp_c.shape[:-1], self.vocab), -torch.inf)
        out[..., self.idx.to(out.device)] = logp_c
        return out

    @torch.no_grad()
    def exact(self) -> torch.Tensor:
        """The model's exact log-probs (B, n, V) at the positions drafted since the last call."""
        h = torch.cat(self.hidden, dim=1)
        self.hidden.clear()
        return torch.log_softmax(self.lin(h).float(), dim=-1)
