"""What the heads do alike on per-example log p(true) arrays: the NLL-optimal weights (exact for
two models, EM on the simplex for K) and, on the reported data, the NLL optimum k*, the
improvement domain and the gain curve against k."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from arfuse.fusion import w_to_k
from arfuse.search import OptimumResult, gain_curve, improvement_domain, optimal_weight, optimal_weights_em


@dataclass
class NLLChoice:
    weights: list[float]
    optimum: OptimumResult | None   # two models: the exact optimum
    iterations: int                 # Newton (two models) or EM (K models) iterations
    converged: bool


def nll_weights(lps: list[np.ndarray]) -> NLLChoice:
    """The weights (the LLM first) that minimise the mixture NLL of ``lps``, one log p(true) array per model."""
    if len(lps) == 2:
        opt = optimal_weight(lps[0], lps[1])
        return NLLChoice([opt.w, 1.0 - opt.w], opt, opt.iterations, opt.converged)
    ws, iters, conv = optimal_weights_em(lps)
    return NLLChoice(ws.tolist(), None, iters, conv)


def add_domain_and_curve(report, lp_large: np.ndarray, lp_small: np.ndarray, *, points: int, data_name: str) -> None:
    """Set ``report.k_star``, ``optimum_iterations``, ``domain_w``/``domain_k`` and ``curve`` (the gain
    in % at ``points`` weight ratios around the domain) from two models' log p(true) on the reported data."""
    opt = optimal_weight(lp_large, lp_small)
    report.k_star = opt.k
    report.optimum_iterations = opt.iterations
    dom = improvement_domain(lp_large, lp_small, opt)
    if dom is None:
        return
    report.domain_w = dom
    report.domain_k = (w_to_k(dom[0]), math.inf)
    k_lo = max(w_to_k(dom[0]) / 4, 1e-3)
    k_hi = max(opt.k * 8, k_lo * 100) if math.isfinite(opt.k) else k_lo * 1000
    ks = np.geomspace(k_lo, k_hi, points)
    report.curve = {"k": ks.tolist(), "gain_pct": gain_curve(lp_large, lp_small, ks).tolist(), "k_star_test": opt.k,
                    "data": data_name}
