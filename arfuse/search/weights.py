"""The NLL-optimal mixture weight, found exactly on cached log p(target) arrays.

For two models the mixture NLL f(w) = -sum_t log(w p_L(t) + (1 - w) p_S(t)) is convex in
w (minus the log of an affine function), so its minimiser on [0, 1] is unique. We find it
by safeguarded Newton on f'(w) = 0 to 1e-12, working with d_t = log p_S(t) - log p_L(t) so
that nothing underflows:

    f'(w)  = -sum_t (1 - e^d) / (w + (1 - w) e^d)
    f''(w) =  sum_t ((1 - e^d) / (w + (1 - w) e^d))^2

For K models the optimum on the simplex comes from EM,
w_j <- mean_t w_j p_j(t) / sum_i w_i p_i(t), which increases the likelihood monotonically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from arfuse.fusion import linear


@dataclass
class OptimumResult:
    w: float                 # the LLM's weight
    k: float                 # w / (1 - w)
    nll: float               # summed mixture NLL at w
    iterations: int
    converged: bool
    at_boundary: bool        # True when the SLM does not help (w = 1) or the LLM does not (w = 0)


def _d(lp_large: np.ndarray, lp_small: np.ndarray) -> np.ndarray:
    d = np.asarray(lp_small, np.float64) - np.asarray(lp_large, np.float64)
    return np.clip(d, -700.0, 700.0)


def mixture_nll(lp_large: np.ndarray, lp_small: np.ndarray, w: float) -> float:
    """Summed NLL of w p_L + (1 - w) p_S over all positions (float64)."""
    return -float(np.sum(linear([np.asarray(lp_large, np.float64), np.asarray(lp_small, np.float64)], [w, 1.0 - w])))


def _grad_hess(e: np.ndarray, w: float) -> tuple[float, float]:
    g = (1.0 - e) / (w + (1.0 - w) * e)
    with np.errstate(over="ignore"):  # at w = 0 a position the SLM gives ~0 squares past float range:
        return -float(g.sum()), float((g * g).sum())   # the Hessian is inf there, only g's sign is used


def optimal_weight(lp_large: np.ndarray, lp_small: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> OptimumResult:
    """The exact NLL-optimal LLM weight w in [0, 1] for two models' log p(target) arrays."""
    e = np.exp(_d(lp_large, lp_small))  # p_S / p_L per position
    g0, _ = _grad_hess(e, 0.0)  # e > 0 everywhere since d is clipped
    g1, _ = _grad_hess(e, 1.0)
    if g1 <= 0:  # NLL still falling at w = 1: the SLM cannot help
        return OptimumResult(1.0, math.inf, mixture_nll(lp_large, lp_small, 1.0), 0, True, True)
    if g0 >= 0:
        return OptimumResult(0.0, 0.0, mixture_nll(lp_large, lp_small, 0.0), 0, True, True)
    lo, hi = 0.0, 1.0
    w = 0.5
    it = 0
    converged = False
    for it in range(1, max_iter + 1):
        g, h = _grad_hess(e, w)
        if g > 0:
            hi = w
        else:
            lo = w
        step = w - g / h if h > 0 else math.nan
        # take the Newton step when it stays inside the bracket, else bisect
        w_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(w_new - w) < tol or hi - lo < tol:
            w = w_new
            converged = True
            break
        w = w_new
    return OptimumResult(w, w / (1.0 - w), mixture_nll(lp_large, lp_small, w), it, converged, False)


def optimal_weights_em(lps: list[np.ndarray], tol: float = 1e-10, max_iter: int = 100000) -> tuple[np.ndarray, int, bool]:
    """NLL-optimal weights on the simplex for K models (EM); returns (weights, iterations, converged)."""
    x = np.stack([np.asarray(lp, np.float64) for lp in lps])  # (K, N)
    x = x - x.max(axis=0, keepdims=True)
    p = np.exp(x)
    K = len(lps)
    w = np.full(K, 1.0 / K)
    for it in range(1, max_iter + 1):
        mix = w @ p                          # (N,)
        w_new = w * (p / mix).mean(axis=1)
        w_new /= w_new.sum()
        if np.max(np.abs(w_new - w)) < tol:
            return w_new, it, True
        w = w_new
    return w, max_iter, False


def improvement_domain(lp_large: np.ndarray, lp_small: np.ndarray, opt: OptimumResult | None = None,
                       tol: float = 1e-12) -> tuple[float, float] | None:
    """The weights w with fused NLL below the LLM's, as (w_min, 1); None when empty.

    By convexity the set is an interval ending at w = 1; in weight ratios it is (k_min, inf).
    """
    opt = opt or optimal_weight(lp_large, lp_small)
    if opt.w >= 1.0:
        return None
    # with e = p_S / p_L: f(w) - f(1) = -sum log(1 + (1 - w)(e - 1)) =: g(w), convex, g(1) = 0,
    # g(w*) < 0; the domain's left end is the root of g in [0, w*), found by bracketed Newton
    em1 = np.expm1(_d(lp_large, lp_small))  # e - 1, exact for e near 1

    def g_and_slope(w: float) -> tuple[float, float]:
        z = 1.0 + (1.0 - w) * em1
        return -float(np.log(z).sum()), float((em1 / z).sum())

    if g_and_slope(0.0)[0] < 0:  # the SLM alone is better than the LLM alone
        return (0.0, 1.0)
    lo, hi = 0.0, opt.w          # g(lo) >= 0 > g(hi)
    w = lo
    for _ in range(200):
        g, s = g_and_slope(w)
        if g >= 0:
            lo = w
        else:
            hi = w
        step = w - g / s if s != 0 else math.nan
        w_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(w_new - w) < tol or hi - lo < tol:
            w = w_new
            break
        w = w_new
    return (w, 1.0)  # the root of g to within tol


def gain_curve(lp_large: np.ndarray, lp_small: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Relative perplexity gain in % of the fused model over the LLM at each weight ratio k."""
    n = len(lp_large)
    base = mixture_nll(lp_large, lp_small, 1.0)
    out = []
    for k in np.asarray(ks, np.float64):
        w = 1.0 if math.isinf(k) else k / (1.0 + k)
        f = mixture_nll(lp_large, lp_small, w)
        out.append(100.0 * (1.0 - math.exp((f - base) / n)))
    return np.asarray(out)
