"""Log-likelihood of continuations given contexts, through the cached scorer.

Each request (context, continuation) becomes one document ``context + continuation``; the
scorer scores it once (cached like any data set) and the records of the continuation's
tokens are kept. The split follows lm-evaluation-harness: trailing spaces of the context
move to the continuation, the whole text is tokenized, and the continuation is every token
after the context's own token count.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.scoring.records import FIELDS, TokenRecords
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.data.text import Dataset

BLOCK = 128  # requests per cached block


@dataclass
class Continuations:
    """Records of the continuation tokens of every request, concatenated in request order."""

    records: TokenRecords
    request: np.ndarray      # (T,) request index of each token
    n_requests: int
    cont_bytes: np.ndarray | None = None  # (n_requests,) UTF-8 bytes of each continuation string after split_pair

    def loglik(self) -> np.ndarray:
        """Summed log p of each request's continuation (float64)."""
        return np.bincount(self.request, weights=self.records.logp.astype(np.float64), minlength=self.n_requests)

    def n_tokens(self) -> np.ndarray:
        return np.bincount(self.request, minlength=self.n_requests)

    def token_logp(self) -> np.ndarray:
        """(T,) float64: each continuation token's log p, in the records' order."""
        return self.records.logp.astype(np.float64)

    def token_ends(self, pairs: list[tuple[str, str]] | None = None) -> np.ndarray:
        """(T,) int64, in the records' order: the byte offset where each continuation token ends,
        relative to the start of its request's continuation string as ``split_pair`` gives it (the
        context's trailing spaces included). A request's last token ends at the string's length;
        a token closing no byte (part of a character) ends where the token before it does. The
        first token starts at its end less its ``nbytes``: below 0 where the tokenizer merged the
        context's last characters into it. ``pairs`` gives the strings' lengths to Continuations
        made without them."""
        if self.cont_bytes is not None:
            total = np.asarray(self.cont_bytes, np.int64)
        elif pairs is not None:
            if len(pairs) != self.n_requests:
                raise ArfuseError(f"token_ends: {len(pairs)} pairs given for {self.n_requests} requests")
            total = continuation_bytes(pairs)
        else:
            raise ArfuseError("token_ends: these continuations carry no continuation lengths; pass the pairs scored")
        req = self.request.astype(np.int64)
        order = np.lexsort((self.records.pos, req))
        nb = self.records.nbytes.astype(np.int64)[order]
        r = req[order]
        cum = np.cumsum(nb)                                  # bytes closed up to and including each token
        last = np.ones(len(r), bool)
        last[:-1] = r[1:] != r[:-1]
        upto = np.zeros(self.n_requests, np.int64)
        upto[r[last]] = cum[last]                            # cum at each request's last token
        ends = np.empty(len(r), np.int64)
        ends[order] = total[r] - (upto[r] - cum)
        return ends


def continuation_bytes(pairs: list[tuple[str, str]]) -> np.ndarray:
    """UTF-8 bytes of each continuation string after ``split_pair`` (a lone surrogate counts 3, as
    the scorer counts it)."""
    return np.array([len(split_pair(c, x)[1].encode("utf-8", "surrogatepass")) for c, x in pairs], np.int64)


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing spaces to the continuation (lm-evaluation-harness's rule)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def score_continuations(model: CausalLM, pairs: list[tuple[str, str]], cfg: ScoreConfig, *, name: str,
                        batch_size: int = 8, use_cache: bool = True, progress: bool = True) -> Continuations:
    """Records of each continuation's tokens given its context (full context up to the window)."""
    if not pairs:
        raise ArfuseError(f"{name}: no requests to score")
    docs, n_ctx = [], []
    for i, (c, x) in enumerate(pairs):
        c, x = split_pair(c, x)
        if not x:
            raise ArfuseError(f"{name}: request {i} has an empty continuation")
        docs.append(c + x)
        n_ctx.append(len(model.encode(c).ids) if c else 0)
    bos = model.uses_bos(cfg.bos)
    # fixed blocks of requests, each cached on its own: a longer --limit reuses the blocks
    # already scored, and an interrupted run keeps the finished ones
    parts = []
    for b0 in range(0, len(docs), BLOCK):
        block = docs[b0:b0 + BLOCK]
        window = cfg.window if model.info.max_length is None else min(cfg.window, model.info.max_length)
        # only blocks that may not fit the window are tokenized here to measure them
        bounds = [model.token_bound(d) for d in block]
        fits = all(b is not None for b in bounds) and max(bounds) + int(bos) <= window
        longest = 0 if fits else max(len(model.encode(d).ids) for d in block) + int(bos)
        if window < longest:  # every continuation sees its whole context when the model allows it
            window = min(longest, model.info.max_length or longest)
        bcfg = replace(cfg, window=window, stride=min(cfg.stride or window, window))
        h = hashlib.sha256("\x00".join(block).encode()).hexdigest()[:12]
        r = score(model, Dataset(f"{name}#{b0}-{b0 + len(block)}#{h}", block, source=name), bcfg,
                  batch_size=batch_size, use_cache=use_cache, progress=progress)
        r.doc = r.doc + b0
        parts.append(r)
    rec = TokenRecords.concat(parts, meta=parts[0].meta)
    start = np.asarray(n_ctx, np.int64) + int(bos)
    keep = rec.pos >= start[rec.doc]
    if not keep.any():
        raise ArfuseError(f"{name}: no continuation token was scored")
    sub = TokenRecords(*(getattr(rec, f)[keep] for f in FIELDS), meta=rec.meta)
    req = sub.doc.astype(np.int64)
    counts = np.bincount(req, minlength=len(pairs))
    if (counts == 0).any():
        bad = int(np.flatnonzero(counts == 0)[0])
        raise ArfuseError(f"{name}: request {bad}'s continuation {pairs[bad][1]!r} merges into its context's last "
                          f"token under {model.info.name}'s tokenizer: it has no token of its own to score")
    return Continuations(sub, req, len(pairs), continuation_bytes(pairs))


@torch.no_grad()
def continuation_distributions(model: CausalLM, pairs: list[tuple[str, str]], conts: Continuations, cfg: ScoreConfig,
                               idx: Iterable[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(i, logp (n_i, V) float32, targets (n_i,))`` at request i's continuation tokens, for each i
    of ``idx``: one forward per request over its whole text (the last max_length tokens of a
    longer one), checked against the cached records ``conts`` of the same model."""
    bos = model.uses_bos(cfg.bos)
    order = np.argsort(conts.request, kind="stable")
    starts = np.concatenate([[0], np.cumsum(conts.n_tokens())])
    for i in idx:
        c, x = split_pair(*pairs[i])
        ids = ([model.bos_id] if bos else []) + list(model.encode(c + x).ids)
        tgt = conts.records.target[order[starts[i]:starts[i + 1]]]
        n = len(tgt)
        if n == 0 or not np.array_equal(np.asarray(ids[len(ids) - n:]), tgt):
            raise ArfuseError(f"{model.info.name}: request {i}'s continuation does not line up with the cached "
                              "records; rescore with --no-cache")
        ctx = ids[:-1] if model.info.max_length is None else ids[:-1][-model.info.max_length:]
        logits = model.forward_logits_tail(torch.as_tensor(ctx)[None].to(model.device), n)[0]  # (n, V)
        yield i, torch.log_softmax(logits.float(), dim=-1).cpu(), torch.as_tensor(tgt).long()
