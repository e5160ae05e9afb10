"""Per example, the open interval of weight ratios k where the fused model is right.

For two probability heads over the same candidates (tokens, answer options, image
classes), the fused model P = w p_L + (1 - w) p_S predicts, at k = w / (1 - w),

    argmax_c  k p_L(c) + p_S(c)          (scaling by 1 / (1 + k) changes no argmax)

The target t wins against a candidate c exactly when k (p_L(t) - p_L(c)) >= p_S(c) - p_S(t):
one half-line in k per candidate, bounded by the exchange threshold (p_S(c) - p_S(t)) /
(p_L(t) - p_L(c)) of the paper's Lemma A.2.3. Their intersection is one interval (L, U):
every example is right exactly on an interval of k (``arfuse.search.accuracy`` sums them into
the accuracy curve).

A word of several tokens (LAMBADA) is right when each of its tokens is the argmax: the
intersection of the tokens' intervals, again one interval.

Per-token records keep only each model's top-k tokens. A token outside a model's list
has a probability at most that model's k-th; so every example gets a certified interval
(right whatever the unknown probabilities are) and a possible one (right for some values
they may take). Where they agree the curve is exact; where they differ the undetermined
examples are counted, never guessed (the DESIGN's top-k certificate).

Ties (two candidates with exactly equal fused probability) go to the lower candidate
index, as ``numpy.argmax`` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from arfuse.errors import ArfuseError

_CHUNK = 16384  # examples per block: bounds memory at (block, candidates) float64 arrays


# ---- intervals per example ---------------------------------------------------------------
@dataclass
class Intervals:
    """For each example, the open k-intervals where the fused model is right.

    ``lo``/``hi`` hold the endpoints of the certified interval (right for any value of the
    unknown probabilities) and ``plo``/``phi`` those of the possible one. An empty interval
    has lo >= hi. ``llm_right``/``slm_right``: each model alone (k = inf and k = 0).
    """

    lo: np.ndarray
    hi: np.ndarray
    plo: np.ndarray
    phi: np.ndarray
    llm_right: np.ndarray
    slm_right: np.ndarray

    def __len__(self) -> int:
        return len(self.lo)

    @property
    def exact(self) -> bool:
        """True when no example is undetermined at any k."""
        same = (self.lo == self.plo) & (self.hi == self.phi)
        empty = (self.lo >= self.hi) & (self.plo >= self.phi)
        return bool(np.all(same | empty))

    def right_at(self, k: float) -> np.ndarray:
        """Certified right at k (bool per example); k must not be a threshold."""
        if k == 0:
            return self.slm_right.copy()
        if math.isinf(k):
            return self.llm_right.copy()
        return (self.lo < k) & (k < self.hi)

    def possibly_right_at(self, k: float) -> np.ndarray:
        if k == 0:
            return self.slm_right.copy()
        if math.isinf(k):
            return self.llm_right.copy()
        return (self.plo < k) & (k < self.phi)

    def subset(self, idx) -> "Intervals":
        return Intervals(self.lo[idx], self.hi[idx], self.plo[idx], self.phi[idx], self.llm_right[idx],
                         self.slm_right[idx])


def _halfline_bounds(a: np.ndarray, b: np.ndarray, valid: np.ndarray, tie_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval of k > 0 with k a >= b for every valid column (row-wise).

    a = p_L(t) - p_L(c), b = p_S(c) - p_S(t). a > 0: k >= b / a; a < 0: k <= b / a;
    a == 0: always when b < 0 (or b == 0 and the tie goes to the target), never otherwise.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = b / a
    lower = np.where(valid & (a > 0), ratio, -np.inf).max(axis=1, initial=-np.inf)
    upper = np.where(valid & (a < 0), ratio, np.inf).min(axis=1, initial=np.inf)
    never = (valid & (a == 0) & ((b > 0) | ((b == 0) & ~tie_ok))).any(axis=1)
    lo = np.maximum(lower, 0.0)
    hi = np.where(never, 0.0, upper)
    return lo, hi


def _argmax_right(p: np.ndarray, ids: np.ndarray, valid: np.ndarray, pt: np.ndarray, tid: np.ndarray) -> np.ndarray:
    """Whether the target beats every valid candidate on one model's probabilities (ties: lower id)."""
    beats = (pt[:, None] > p) | ((pt[:, None] == p) & (tid[:, None] < ids))
    return np.all(beats | ~valid, axis=1)


def intervals_from_probs(p_large, p_small, target, *, valid=None) -> Intervals:
    """Exact intervals from full candidate probabilities.

    p_large, p_small: (N, C) probabilities (or any non-negative scores) of the C candidates
    (answer options, classes) under each model; target: (N,) index of the right candidate;
    valid: optional (N, C) bool mask for ragged candidate lists (False = no such option).
    Ties go to the lower candidate index.
    """
    pl = np.asarray(p_large, np.float64)
    ps = np.asarray(p_small, np.float64)
    t = np.asarray(target, np.int64)
    if pl.ndim != 2 or pl.shape != ps.shape:
        raise ArfuseError(f"candidate probabilities must be two (N, C) arrays of one shape, got {pl.shape} and {ps.shape}")
    n, c = pl.shape
    if t.shape != (n,):
        raise ArfuseError(f"target must hold one candidate index per example ({n}), got shape {t.shape}")
    if n and (t.min() < 0 or t.max() >= c):
        raise ArfuseError(f"a target index is outside 0..{c - 1}: targets index the candidate columns")
    val = np.ones((n, c), bool) if valid is None else np.asarray(valid, bool)
    if n and not val[np.arange(n), t].all():
        bad = int(np.flatnonzero(~val[np.arange(n), t])[0])
        raise ArfuseError(f"example {bad}: its target {int(t[bad])} is not one of its valid candidates")
    few = val.sum(axis=1) < 2
    if few.any():
        bad = int(np.flatnonzero(few)[0])
        raise ArfuseError(f"example {bad} has {int(val[bad].sum())} candidate: fusion needs at least 2 to choose from")
    rows = np.arange(n)
    ids = np.broadcast_to(np.arange(c), (n, c))
    others = val.copy()
    others[rows, t] = False
    tl, ts = pl[rows, t], ps[rows, t]
    lo, hi = _halfline_bounds(tl[:, None] - pl, ps - ts[:, None], others, t[:, None] < ids)
    llm = _argmax_right(pl, ids, others, tl, t)
    slm = _argmax_right(ps, ids, others, ts, t)
    return Intervals(lo, hi, lo.copy(), hi.copy(), llm, slm)


def intervals_from_topk(target, logp_large, logp_small, topk_ids_large, topk_logp_large, topk_ids_small,
                        topk_logp_small, vocab_size: int | None = None) -> Intervals:
    """Certified and possible intervals for LM argmax from per-token top-k records.

    target: (N,) token ids; logp_*: (N,) log p(target) of each model; topk_*: (N, K) each
    model's K most likely tokens and their log-probs. With K equal to the vocabulary the
    result is exact. Without ``vocab_size`` the tokens outside both lists are assumed to exist.
    """
    t = np.asarray(target, np.int64)
    n = len(t)
    out = [np.empty(n) for _ in range(4)] + [np.empty(n, bool), np.empty(n, bool)]
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        parts = _topk_block(t[a:b], np.asarray(logp_large[a:b]), np.asarray(logp_small[a:b]),
                            np.asarray(topk_ids_large[a:b]), np.asarray(topk_logp_large[a:b]),
                            np.asarray(topk_ids_small[a:b]), np.asarray(topk_logp_small[a:b]), vocab_size)
        for dst, src in zip(out, parts):
            dst[a:b] = src
    return Intervals(*out)


def _topk_block(t, lpl, lps, idl, lpkl, ids_, lpks, vocab_size):
    n, kl = idl.shape
    ks = ids_.shape[1]
    tl, ts = np.exp(lpl.astype(np.float64)), np.exp(lps.astype(np.float64))
    pl_list, ps_list = np.exp(lpkl.astype(np.float64)), np.exp(lpks.astype(np.float64))
    min_l, min_s = pl_list[:, -1], ps_list[:, -1]  # any token outside a list has at most this
    # candidates: the LLM's list (SLM prob known where the token is also in the SLM's list),
    # then the SLM's tokens missing from the LLM's list (LLM prob unknown)
    pos_s, in_s = _lookup(idl, ids_)                          # (n, kl): where each LLM token sits in the SLM's list
    ps_of_l = np.where(in_s, np.take_along_axis(ps_list, pos_s, 1), np.nan)
    _, in_l = _lookup(ids_, idl)                              # (n, ks)
    not_t_l, not_t_s = idl != t[:, None], ids_ != t[:, None]
    # certified: unknown probabilities at their upper bounds; possible: at 0
    a_l = tl[:, None] - pl_list
    b_l_hi = np.where(in_s, ps_of_l, min_s[:, None]) - ts[:, None]
    b_l_lo = np.where(in_s, ps_of_l, 0.0) - ts[:, None]
    a_s_hi = tl[:, None] - min_l[:, None]                     # SLM-only token at the LLM's bound
    a_s_lo = np.broadcast_to(tl[:, None], (n, ks))            # ... or at 0
    b_s = ps_list - ts[:, None]
    valid_l, valid_s = not_t_l, not_t_s & ~in_l
    tie_l = t[:, None] < idl  # SLM-only tokens are bounded, not known: they never tie
    # a token in neither list: at most (min_l, min_s); exists unless the lists cover the vocabulary
    union = valid_l.sum(1) + valid_s.sum(1) + 1
    outside = np.ones(n, bool) if vocab_size is None else union < vocab_size
    a_o = (tl - min_l)[:, None]
    b_o = (min_s - ts)[:, None]
    # a known token ties with the target by id; a token whose probability is only bounded never does
    A = np.concatenate([a_l, np.broadcast_to(a_s_hi, (n, ks)), a_o], axis=1)
    B = np.concatenate([b_l_hi, b_s, b_o], axis=1)
    V = np.concatenate([valid_l, valid_s, outside[:, None]], axis=1)
    T = np.concatenate([tie_l & in_s, np.zeros((n, ks), bool), np.zeros((n, 1), bool)], axis=1)
    lo, hi = _halfline_bounds(A, B, V, T)
    A2 = np.concatenate([a_l, a_s_lo], axis=1)
    B2 = np.concatenate([b_l_lo, b_s], axis=1)
    V2 = np.concatenate([valid_l, valid_s], axis=1)
    # possible: a tie with a token whose probability is only bounded may go either way
    T2 = np.concatenate([np.where(in_s, tie_l, True), np.ones((n, ks), bool)], axis=1)
    plo, phi = _halfline_bounds(A2, B2, V2, T2)
    # each model alone: the head of its own list (its argmax as the records give it)
    llm = idl[:, 0] == t
    slm = ids_[:, 0] == t
    return lo, hi, plo, phi, llm, slm


def _lookup(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise: the column of each a[i, j] in b[i] and whether it is there. (n, ka), (n, kb) ids."""
    n, kb = b.shape
    big = int(max(a.max(initial=0), b.max(initial=0))) + 1
    off = (np.arange(n, dtype=np.int64) * big)[:, None]
    order = np.argsort(b, axis=1, kind="stable")
    flat = (np.take_along_axis(b, order, 1).astype(np.int64) + off).ravel()
    q = a.astype(np.int64) + off
    at = np.minimum(np.searchsorted(flat, q.ravel()), flat.size - 1).reshape(a.shape)
    found = flat[at] == q
    local = np.where(found, at - (np.arange(n) * kb)[:, None], 0)
    return np.take_along_axis(order, local, 1), found


def intervals_from_records(rec_large, rec_small) -> Intervals:
    """Intervals of next-token argmax accuracy from two models' aligned ``TokenRecords``."""
    if len(rec_large) != len(rec_small) or not np.array_equal(rec_large.target, rec_small.target):
        raise ArfuseError("the two models' records score different tokens: accuracy fusion needs one tokenizer "
                          "and the same data, windowing and BOS policy")
    vocab = rec_large.meta.get("vocab_size")
    return intervals_from_topk(rec_large.target, rec_large.logp, rec_small.logp, rec_large.topk_ids,
                               rec_large.topk_logp, rec_small.topk_ids, rec_small.topk_logp, vocab)


def combine_groups(iv: Intervals, group: np.ndarray) -> Intervals:
    """One interval per group of consecutive examples (a word's tokens): right when all are.

    ``group`` (N,) labels each example; groups need not be contiguous. Returns groups in
    order of their first appearance's label sorted ascending.
    """
    g = np.asarray(group)
    labels, inv = np.unique(g, return_inverse=True)
    m = len(labels)

    def red(x, fn, init):
        out = np.full(m, init, np.float64)
        fn.at(out, inv, x)
        return out

    def all_(x):
        out = np.ones(m, bool)
        np.logical_and.at(out, inv, x)
        return out

    return Intervals(red(iv.lo, np.maximum, -np.inf), red(iv.hi, np.minimum, np.inf),
                     red(iv.plo, np.maximum, -np.inf), red(iv.phi, np.minimum, np.inf),
                     all_(iv.llm_right), all_(iv.slm_right))
