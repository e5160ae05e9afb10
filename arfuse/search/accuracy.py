"""The exact accuracy of the fused model at every weight ratio k, from exchange thresholds.

Every example is right on one open interval of k (``arfuse.search.intervals``, from full
candidate probabilities or from top-k records with a certificate). Sorting the endpoints of
all intervals gives the accuracy at every k in (0, inf) with no grid, its maximum, and where
the fused model beats the LLM alone; at a threshold itself two candidates tie, and the curve
reports the open intervals between thresholds. Also here: the paper's three sets and the
flips at a k, brute-force checks, and the paired bootstrap of a change in accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.search.intervals import (  # noqa: F401  (re-exported: the accuracy API imports them from here)
    Intervals, combine_groups, intervals_from_probs, intervals_from_records, intervals_from_topk,
)


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
