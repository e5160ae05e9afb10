import itertools

import numpy as np
import pytest

from arfuse.fusion import linear
from arfuse.search import gain_curve, improvement_domain, mixture_nll, optimal_weight, optimal_weights_em


def _pair(seed, n=5000):
    rng = np.random.default_rng(seed)
    lp_l = -rng.gamma(2.0, 1.2, n)               # a better model ...
    lp_s = lp_l + rng.normal(-0.6, 1.5, n)        # ... and a worse one that sometimes wins
    return lp_l, np.minimum(lp_s, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_exact_optimum_beats_every_grid_point(seed):
    lp_l, lp_s = _pair(seed)
    opt = optimal_weight(lp_l, lp_s)
    assert opt.converged and 0 < opt.w < 1
    grid = np.linspace(0, 1, 1001)
    nll = np.array([mixture_nll(lp_l, lp_s, w) for w in grid])
    assert opt.nll <= nll.min() + 1e-9
    # the derivative vanishes: NLL at w +- 1e-6 is no lower
    assert mixture_nll(lp_l, lp_s, opt.w - 1e-6) >= opt.nll - 1e-9
    assert mixture_nll(lp_l, lp_s, opt.w + 1e-6) >= opt.nll - 1e-9
    # a direct numpy computation of the fused NLL at w
    direct = -np.sum(np.log(opt.w * np.exp(lp_l) + (1 - opt.w) * np.exp(lp_s)))
    assert opt.nll == pytest.approx(direct, rel=1e-12)


def test_slm_that_never_helps_gives_w_one():
    lp_l = np.full(100, -1.0)
    lp_s = np.full(100, -5.0)
    opt = optimal_weight(lp_l, lp_s)
    assert opt.w == 1.0 and opt.at_boundary
    assert improvement_domain(lp_l, lp_s, opt) is None


def test_improvement_domain_endpoint_is_where_fused_equals_llm():
    lp_l, lp_s = _pair(11)
    opt = optimal_weight(lp_l, lp_s)
    lo, hi = improvement_domain(lp_l, lp_s, opt)
    assert hi == 1.0 and 0 < lo < opt.w
    base = mixture_nll(lp_l, lp_s, 1.0)
    assert mixture_nll(lp_l, lp_s, lo) == pytest.approx(base, abs=1e-6)
    assert mixture_nll(lp_l, lp_s, lo + 1e-4) < base < mixture_nll(lp_l, lp_s, lo - 1e-4)
    k_lo = lo / (1 - lo)
    g = gain_curve(lp_l, lp_s, np.array([k_lo * 0.9, k_lo * 1.1, opt.k, 1e9]))
    assert g[0] < 0 < g[1] < g[2] and abs(g[3]) < 1e-5


def test_em_on_the_simplex_matches_a_grid():
    rng = np.random.default_rng(3)
    lps = [-rng.gamma(2.0, s, 3000) for s in (1.0, 1.3, 1.6)]
    w, iters, conv = optimal_weights_em(lps)
    assert conv and w.sum() == pytest.approx(1.0)
    best = -np.sum(linear(lps, w.tolist()))
    for a, b in itertools.product(np.linspace(0, 1, 41), repeat=2):
        if a + b <= 1:
            assert -np.sum(linear(lps, [a, b, max(0.0, 1 - a - b)])) >= best - 1e-6
    # two models: EM and Newton agree
    w2, _, _ = optimal_weights_em(lps[:2])
    assert w2[0] == pytest.approx(optimal_weight(lps[0], lps[1]).w, abs=1e-6)


@pytest.mark.parametrize("seed", range(1, 5))
def test_domain_left_end_is_the_crossing_on_either_side(seed):
    """Fused NLL is above the LLM's just left of w_min and below it just right (Newton's root)."""
    from arfuse.search.weights import improvement_domain, mixture_nll, optimal_weight

    rng = np.random.default_rng(seed)
    a = np.log(rng.uniform(0.01, 1, 20000))
    b = np.log(rng.uniform(0.001, 0.4 + 0.1 * seed, 20000))
    opt = optimal_weight(a, b)
    w_min, w_max = improvement_domain(a, b, opt)
    assert 0 < w_min < opt.w < w_max == 1.0
    f1 = mixture_nll(a, b, 1.0)
    assert mixture_nll(a, b, w_min + 1e-8) < f1 < mixture_nll(a, b, w_min - 1e-8)
