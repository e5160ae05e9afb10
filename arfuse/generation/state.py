"""One model's incremental decoding state: its KV cache, which cached positions are real
tokens, and how to take back drafts it has seen (speculative decoding) or drop finished rows.

Each step runs the model only on tokens it has not seen. Rejected drafts become masked-out
positions of the cache (cropped when they are trailing in every row), and each row's next
position counts its real tokens only, so a row's results never depend on the others.
"""
from __future__ import annotations

import torch

from arfuse.adapters.base import CausalLM


class ModelState:
    """Feed new tokens, get their float32 next-token log-probs; roll back; select rows."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.past = None
        self.incremental = hasattr(model, "forward_step")
        self.seqs: list[list[int]] | None = None   # only without a KV cache: each row's real tokens
        self.fed = 0                               # model calls, for statistics

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs (B, T, V) after each of the new tokens ``ids`` (B, T); ``mask`` marks real ones."""
        self.fed += 1
        if self.incremental:
            logits, self.past = self.model.forward_step(ids, self.past, mask)
            return torch.log_softmax(logits.float(), dim=-1)
        return self._feed_full(ids, mask)

    def _feed_full(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Without a KV cache: rerun each row on its whole sequence (correct, slow)."""
        B, T = ids.shape
        real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool().cpu()
        if self.seqs is None:
            self.seqs = [[] for _ in range(B)]
        out = []
        for b in range(B):
            new = [int(t) for t, r in zip(ids[b].tolist(), real[b].tolist()) if r]
            self.seqs[b].extend(new)
            x = torch.tensor([self.seqs[b]], dtype=torch.long, device=self.model.device)
            lp = torch.log_softmax(self.model.forward_logits_tail(x, len(new)).float(), dim=-1)[0].cpu()  # (n, V)
            row = torch.zeros(T, lp.shape[-1])
            row[real[b]] = lp
            out.append(row)
        return torch.stack(out)

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        """Of the last ``n_fed`` tokens fed, row b keeps the first ``keep[b]``; the rest are forgotten."""
        keep = keep.cpu()
        if not self.incremental:
            for b, k in enumerate(keep.tolist()):
                drop = n_fed - k
                if drop:
                    del self.seqs[b][len(self.seqs[b]) - drop:]
            return
        past = self.past
        L = past.mask.shape[1]
        tail = past.mask[:, L - n_fed:]  # (B, n_fed)
        kept = tail & (torch.arange(n_fed)[None, :] < keep[:, None])
        past.mask = torch.cat([past.mask[:, :L - n_fed], kept], dim=1)
        past.next_pos = past.next_pos - (tail & ~kept).long().sum(1)
        # crop positions that no row uses any more
        used = past.mask.any(0)
        trailing = int(L - (torch.nonzero(used).max().item() + 1)) if used.any() else L
        if trailing:
            self._crop(trailing)

    def _crop(self, n: int) -> None:
        past = self.past
        past.mask = past.mask[:, :-n]
        if hasattr(past, "cache"):  # transformers cache, edited in place
            past.cache.crop(-n)
        else:  # llama2.c KVCache
            past.keys = [k[:, :, :-n] for k in past.keys]
            past.values = [v[:, :, :-n] for v in past.values]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (1-D long), in that order."""
        if not self.incremental:
            self.seqs = [self.seqs[i] for i in rows.tolist()]
            return
        past = self.past
        if past is None:
            return
        past.mask = past.mask[rows]
        past.next_pos = past.next_pos[rows]
        if hasattr(past, "cache"):
            past.cache.batch_select_indices(rows.to(self.model.device))
        else:
            dev = past.keys[0].device
            past.keys = [k[rows.to(dev)] for k in past.keys]
            past.values = [v[rows.to(dev)] for v in past.values]
