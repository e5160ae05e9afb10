"""The exact accuracy of the fused model at every weight ratio k, from exchange thresholds.

For two probability heads over the same candidates (tokens, answer options, image
classes), the fused model P = w p_L + (1 - w) p_S predicts, at k = w / (1 - w),

    argmax_c  k p_L(c) + p_S(c)          (scaling by 1 / (1 + k) changes no argmax)

The target t wins against a candidate c exactly when k (p_L(t) - p_L(c)) >= p_S(c) - p_S(t):
one half-line in k per candidate, bounded by the exchange threshold (p_S(c) - p_S(t)) /
(p_L(t) - p_L(c)) of the paper's Lemma A.2.3. Their intersection is one interval (L, U):
every example is right exactly on an interval of k. Sorting the endpoints of all
intervals gives the accuracy at every k in (0, inf) with no grid, its maximum, and where
the fused model beats the LLM alone.

A word of several tokens (LAMBADA) is right when each of its tokens is the argmax: the
intersection of the tokens' intervals, again one interval.

Per-token records keep only each model's top-k tokens. A token outside a model's list
has a probability at most that model's k-th; so every example gets a certified interval
(right whatever the unknown probabilities are) and a possible one (right for some values
they may take). Where they agree the curve is exact; where they differ the undetermined
examples are counted, never guessed (the DESIGN's top-k certificate).

Ties (two candidates with exactly equal fused probability) go to the lower candidate
index, as ``numpy.argmax`` does; at a threshold itself two candidates tie, and the curve
reports the open intervals between thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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


# ---- the curve ---------------------------------------------------------------------------
@dataclass
class AccuracyCurve:
    """Accuracy of the fused model on every open interval between consecutive thresholds.

    Segment j is (thresholds[j-1], thresholds[j]) with thresholds[-1] = 0 and
    thresholds[m] = inf; ``right_lo[j]``/``right_hi[j]`` count the examples certainly /
    possibly right there (equal when the curve is exact).
    """

    thresholds: np.ndarray
    right_lo: np.ndarray
    right_hi: np.ndarray
    n: int
    llm_right: int
    slm_right: int
    exact: bool
    meta: dict = field(default_factory=dict)

    @property
    def acc_llm(self) -> float:
        return self.llm_right / self.n

    @property
    def acc_slm(self) -> float:
        return self.slm_right / self.n

    def segment(self, k: float) -> int:
        return int(np.searchsorted(self.thresholds, k, side="right"))

    def right_at(self, k: float) -> tuple[int, int]:
        """(certainly right, possibly right) at k; k = 0 and k = inf are each model alone."""
        if k == 0:
            return self.slm_right, self.slm_right
        if math.isinf(k):
            return self.llm_right, self.llm_right
        j = self.segment(k)
        return int(self.right_lo[j]), int(self.right_hi[j])

    def accuracy_at(self, k: float) -> float:
        """Accuracy at k (the certified lower bound where the top-k certificate fails)."""
        return self.right_at(k)[0] / self.n

    def segment_bounds(self, j: int) -> tuple[float, float]:
        lo = 0.0 if j == 0 else float(self.thresholds[j - 1])
        hi = math.inf if j == len(self.thresholds) else float(self.thresholds[j])
        return lo, hi

    def best(self) -> "BestK":
        """The accuracy-optimal k: the segment of highest certified accuracy (the one nearest
        the LLM, i.e. of largest k, among ties), with a representative k inside it."""
        top = int(self.right_lo.max())
        js = np.flatnonzero(self.right_lo == top)
        j = int(js[-1])
        lo, hi = self.segment_bounds(j)
        return BestK(k=_inside(lo, hi), k_range=(lo, hi), right=top, accuracy=top / self.n,
                     gain=(top - self.llm_right) / self.n, n_best_segments=len(js))

    def domain(self) -> dict:
        """Where the fused model beats the LLM (certified), and the improvement domain
        (k_min, inf): the largest tail of k over which it is never certainly worse."""
        better = self.right_lo > self.llm_right
        worse = self.right_lo < self.llm_right  # may be worse (certainly, or where the certificate fails)
        segs = [self.segment_bounds(int(j)) for j in np.flatnonzero(better)]
        # k_min: the last segment (from the right) where the fused model may be worse ends the tail
        w = np.flatnonzero(worse)
        k_min = 0.0 if len(w) == 0 else self.segment_bounds(int(w[-1]))[1]
        return {"better_segments": _merge(segs), "k_min": k_min, "worse_anywhere": bool(len(w))}

    def gain_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Step curve for plotting: segment edges (k) and certified accuracy gain over the LLM
        in percentage points, one value per segment."""
        edges = np.concatenate([[0.0], self.thresholds, [np.inf]])
        return edges, 100.0 * (self.right_lo - self.llm_right) / self.n

    def to_dict(self, max_points: int | None = None) -> dict:
        best = self.best()
        d = {"n": self.n, "acc_llm": self.acc_llm, "acc_slm": self.acc_slm, "exact": self.exact,
             "n_thresholds": int(len(self.thresholds)), "best": best.__dict__, "domain": self.domain(), **self.meta}
        if max_points is None or len(self.thresholds) <= max_points:
            d["thresholds"] = self.thresholds.tolist()
            d["right_lo"] = self.right_lo.tolist()
            d["right_hi"] = self.right_hi.tolist()
        return d


@dataclass
class BestK:
    k: float
    k_range: tuple[float, float]
    right: int
    accuracy: float
    gain: float               # accuracy minus the LLM's, as a fraction
    n_best_segments: int


def _inside(lo: float, hi: float) -> float:
    """A representative point of (lo, hi): the geometric mean, or a factor 2 past a finite end."""
    if lo == 0 and math.isinf(hi):
        return 1.0
    if lo == 0:
        return hi / 2
    if math.isinf(hi):
        return lo * 2
    return math.sqrt(lo * hi)


def _merge(segs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in segs:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def curve_from_intervals(iv: Intervals, **meta) -> AccuracyCurve:
    """The exact step curve: +1 where an interval opens, -1 where it closes, summed over k."""
    n = len(iv)
    if n == 0:
        raise ArfuseError("no examples to compute an accuracy curve on")
    ends = np.concatenate([iv.lo, iv.hi, iv.plo, iv.phi])
    thr = np.unique(ends[np.isfinite(ends) & (ends > 0)])
    m = len(thr)

    def count(lo, hi):
        start = np.searchsorted(thr, lo, side="right")   # first segment above lo
        stop = np.searchsorted(thr, hi, side="left")     # last segment below hi
        ok = (lo < hi) & (start <= stop)
        diff = np.zeros(m + 2, np.int64)
        np.add.at(diff, start[ok], 1)
        np.add.at(diff, stop[ok] + 1, -1)
        return np.cumsum(diff)[: m + 1]

    lo_c = count(iv.lo, iv.hi)
    hi_c = count(iv.plo, iv.phi)
    return AccuracyCurve(thr, lo_c, hi_c, n, int(iv.llm_right.sum()), int(iv.slm_right.sum()),
                         bool(np.array_equal(lo_c, hi_c)), dict(meta))


# ---- the paper's three sets and the flips at a k -------------------------------------------
def three_sets(iv: Intervals, k: float) -> dict:
    """Appendix A's partition and what the fused model does to each part at k.

    S1: LLM wrong, SLM right; S2: LLM right, SLM wrong; S3: both right or both wrong.
    Flips: wrong -> right and right -> wrong relative to the LLM alone (certified counts;
    ``undetermined`` where the top-k certificate fails at k).
    """
    L, S = iv.llm_right, iv.slm_right
    fused = iv.right_at(k)
    possible = iv.possibly_right_at(k)
    und = possible & ~fused
    s1, s2 = ~L & S, L & ~S
    s3 = ~(s1 | s2)

    def part(mask):
        return {"size": int(mask.sum()), "fixed": int((mask & ~L & fused).sum()),
                "broken": int((mask & L & ~possible).sum()), "undetermined": int((mask & und).sum())}

    return {"k": k, "n": len(iv), "S1_llm_wrong_slm_right": part(s1), "S2_llm_right_slm_wrong": part(s2),
            "S3_agree": part(s3), "flips_wrong_to_right": int((~L & fused).sum()),
            "flips_right_to_wrong": int((L & ~possible).sum()), "undetermined": int(und.sum())}


# ---- brute force (for tests and spot checks) ------------------------------------------------
def brute_force_right(p_large: np.ndarray, p_small: np.ndarray, target: np.ndarray, k: float) -> np.ndarray:
    """Whether argmax of the fused probabilities is the target at k, computed directly."""
    w = 1.0 if math.isinf(k) else k / (1.0 + k)
    fused = w * np.asarray(p_large, np.float64) + (1.0 - w) * np.asarray(p_small, np.float64)
    return fused.argmax(axis=1) == np.asarray(target)


def pareto_front(p_large: np.ndarray, p_small: np.ndarray):
    """Per row, the candidates no other candidate beats or ties in both models (padded with -1).

    A candidate d with p_L(d) >= p_L(c) and p_S(d) >= p_S(c) scores at least as high as c at
    every weight (and wins ties by index when it comes first), so dropping c never changes
    the fused argmax: a brute force over the front is still a brute force, on a few columns
    instead of a whole vocabulary. Returns (front p_L, front p_S, candidate ids), ids sorted.
    """
    pl, ps = np.asarray(p_large, np.float64), np.asarray(p_small, np.float64)
    n, v = pl.shape
    order = np.lexsort((np.broadcast_to(np.arange(v), (n, v)), -pl), axis=1)  # by p_L desc, then index
    ps_sorted = np.take_along_axis(ps, order, 1)
    run = np.maximum.accumulate(ps_sorted, axis=1)
    keep = np.ones((n, v), bool)
    keep[:, 1:] = ps_sorted[:, 1:] > run[:, :-1]
    f = int(keep.sum(1).max())
    ids = np.full((n, f), v, np.int64)
    for i in range(n):
        kept = np.sort(order[i][keep[i]])  # by index, so argmax breaks ties as on the full row
        ids[i, : len(kept)] = kept
    pad = ids == v
    safe = np.where(pad, 0, ids)
    return (np.where(pad, -1.0, np.take_along_axis(pl, safe, 1)), np.where(pad, -1.0, np.take_along_axis(ps, safe, 1)),
            ids)


def brute_force_front_right(front, target: np.ndarray, k: float) -> np.ndarray:
    """``brute_force_right`` on the candidates ``pareto_front`` kept."""
    fl, fs, ids = front
    w = 1.0 if math.isinf(k) else k / (1.0 + k)
    pick = (w * fl + (1.0 - w) * fs).argmax(axis=1)
    return ids[np.arange(len(target)), pick] == np.asarray(target)


# ---- paired bootstrap --------------------------------------------------------------------------
def paired_bootstrap(fused_right: np.ndarray, base_right: np.ndarray, *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """The change in accuracy (fused minus base) with a percentile bootstrap interval over examples."""
    d = np.asarray(fused_right, np.float64) - np.asarray(base_right, np.float64)
    n = len(d)
    if n == 0:
        raise ArfuseError("no examples to bootstrap")
    rng = np.random.default_rng(seed)
    # resample counts of each of the three values of d (-1, 0, 1): exact and cheap
    vals = np.array([-1.0, 0.0, 1.0])
    probs = np.array([(d == v).mean() for v in vals])
    counts = rng.multinomial(n, probs, size=n_boot)
    means = counts @ vals / n
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return {"delta": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "n_boot": n_boot, "n": n, "fixed": int((d > 0).sum()), "broken": int((d < 0).sum()), "seed": seed}
