"""The block-bootstrap interval of a perplexity gain."""
from __future__ import annotations

import math

import numpy as np
import pytest

from arfuse.tasks.metrics import bootstrap_ppl_gain


def test_point_estimate_is_the_perplexity_gain_and_inside_the_interval():
    rng = np.random.default_rng(1)
    base = -rng.gamma(2.0, 1.5, size=5000)
    fused = base + rng.normal(0.02, 0.3, size=5000)
    r = bootstrap_ppl_gain(base, fused, block=100, n_boot=500)
    ppl_b, ppl_f = math.exp(-base.mean()), math.exp(-fused.mean())
    assert r["gain_pct"] == pytest.approx(100 * (1 - ppl_f / ppl_b), rel=1e-12)
    assert r["ci_low"] < r["gain_pct"] < r["ci_high"]
    assert r["blocks"] == 50 and r["block_tokens"] == 100


def test_a_uniform_improvement_has_no_spread_and_no_change_has_zero():
    base = np.log(np.full(1234, 0.1))
    fused = base + 0.05                      # every token gains the same: every resample agrees
    r = bootstrap_ppl_gain(base, fused, block=64)
    exact = 100 * (1 - math.exp(-0.05))
    assert r["ci_low"] == pytest.approx(exact, rel=1e-9) and r["ci_high"] == pytest.approx(exact, rel=1e-9)
    r0 = bootstrap_ppl_gain(base, base.copy(), block=64)
    assert (r0["gain_pct"], r0["ci_low"], r0["ci_high"]) == (0.0, 0.0, 0.0)
    assert r["blocks"] == math.ceil(1234 / 64)   # the last block is shorter


def test_noise_widens_the_interval_and_a_negative_gain_stays_negative():
    rng = np.random.default_rng(2)
    base = -rng.gamma(2.0, 1.5, size=4096)
    quiet = bootstrap_ppl_gain(base, base - 0.05 + rng.normal(0, 0.05, 4096), block=128)
    loud = bootstrap_ppl_gain(base, base - 0.05 + rng.normal(0, 1.0, 4096), block=128)
    assert quiet["ci_high"] < 0 and loud["ci_high"] - loud["ci_low"] > 3 * (quiet["ci_high"] - quiet["ci_low"])
    with pytest.raises(ValueError, match="differ"):
        bootstrap_ppl_gain(base, base[:-1])
