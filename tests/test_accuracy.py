"""The exact accuracy curve against brute force: real cached records and model-free cases."""
import math

import numpy as np
import pytest

from arfuse.errors import ArfuseError
from arfuse.search.accuracy import (
    brute_force_front_right, brute_force_right, combine_groups, curve_from_intervals, intervals_from_probs, intervals_from_records,
    intervals_from_topk, paired_bootstrap, pareto_front, three_sets,
)

W_GRID = np.linspace(0.0, 1.0, 10001)


def _k(w: float) -> float:
    return math.inf if w == 1.0 else w / (1.0 - w)


_pareto = pareto_front
_brute = brute_force_front_right


def _dense(rec) -> np.ndarray:
    """Full next-token distributions from records whose top-k covers the vocabulary."""
    p = np.zeros((len(rec), rec.topk_ids.shape[1]))
    np.put_along_axis(p, rec.topk_ids.astype(np.int64), np.exp(rec.topk_logp.astype(np.float64)), axis=1)
    return p


@pytest.fixture(scope="module")
def stories_pair(tmp_path_factory, shared_data):
    """Real cached records of one real model under two contexts: stories260K reading up to 256
    tokens back (the "large" head) and the same weights reading 4-7 tokens back (a weaker head),
    on the first 4,000 characters of Tiny Shakespeare, with the whole 512-token vocabulary kept."""
    from arfuse import adapters
    from arfuse.adapters import load_model
    from arfuse.scoring.scorer import ScoreConfig, score
    from arfuse.data.text import load_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(tmp_path_factory.mktemp("acc_cache")))
        adapters._LOADED.clear()
        model = load_model("stories260k")
        data = load_dataset("tinyshakespeare[:4000]")
        big = score(model, data, ScoreConfig(window=256, stride=128, topk=512), progress=False)
        small = score(model, data, ScoreConfig(window=8, stride=4, topk=512), batch_size=64, progress=False)
        again = score(model, data, ScoreConfig(window=256, stride=128, topk=512), progress=False)  # from the cache
    assert np.array_equal(again.logp, big.logp)
    return big, small


def test_exact_curve_equals_brute_force_on_real_records_at_10001_points(stories_pair):
    big, small = stories_pair
    assert len(big) == len(small) > 2000
    pl, ps, t = _dense(big), _dense(small), big.target.astype(np.int64)
    np.testing.assert_allclose(pl.sum(1), 1.0, atol=1e-4)
    curve = curve_from_intervals(intervals_from_records(big, small))
    assert curve.exact  # the top-k lists cover the whole vocabulary
    assert len(curve.thresholds) > 500  # a real curve with many steps
    ks = np.array([_k(w) for w in W_GRID])
    fin = ks[np.isfinite(ks) & (ks > 0)]
    # no grid point sits on a threshold, where two candidates tie
    gap = np.abs(fin[:, None] - curve.thresholds[None, :]).min(axis=1) / fin
    assert gap.min() > 1e-9
    front = _pareto(pl, ps)
    for k in ks[::500]:  # the reduction itself against the whole vocabulary
        assert np.array_equal(_brute(front, t, k), brute_force_right(pl, ps, t, k))
    mismatches = [k for k in ks if curve.right_at(k)[0] != _brute(front, t, k).sum()]
    assert mismatches == []
    # the ends are each model alone: exact next-token accuracy of each head
    assert curve.llm_right == int((pl.argmax(1) == t).sum())
    assert curve.slm_right == int((ps.argmax(1) == t).sum())
    assert curve.acc_llm > curve.acc_slm  # more context predicts better
    best = curve.best()
    bf_best = max(_brute(front, t, k).sum() for k in ks)
    assert best.right >= bf_best  # the exact optimum is at least the best grid point
    assert brute_force_right(pl, ps, t, best.k).sum() == best.right


def test_topk_certificate_bounds_the_truth_on_real_records(stories_pair):
    big, small = stories_pair
    pl, ps, t = _dense(big), _dense(small), big.target.astype(np.int64)
    K = 32  # what the cache keeps by default
    iv = intervals_from_topk(t, big.logp, small.logp, big.topk_ids[:, :K], big.topk_logp[:, :K],
                             small.topk_ids[:, :K], small.topk_logp[:, :K], vocab_size=512)
    curve = curve_from_intervals(iv)
    front = _pareto(pl, ps)
    for w in W_GRID[::10]:
        k = _k(w)
        lo, hi = curve.right_at(k)
        truth = _brute(front, t, k)
        assert lo <= truth.sum() <= hi
        # per example: certified right implies right; right implies possibly right
        if 0 < k < math.inf:
            assert not (iv.right_at(k) & ~truth).any()
            assert not (truth & ~iv.possibly_right_at(k)).any()
    # the undetermined share is small on real records: the certificate decides almost everything
    assert (curve.right_hi - curve.right_lo).max() <= 0.02 * len(t)


def test_three_sets_and_flips_match_brute_force(stories_pair):
    big, small = stories_pair
    pl, ps, t = _dense(big), _dense(small), big.target.astype(np.int64)
    iv = intervals_from_records(big, small)
    curve = curve_from_intervals(iv)
    k = curve.best().k
    s = three_sets(iv, k)
    L, S, F = pl.argmax(1) == t, ps.argmax(1) == t, brute_force_right(pl, ps, t, k)
    assert s["S1_llm_wrong_slm_right"]["size"] == int((~L & S).sum())
    assert s["S2_llm_right_slm_wrong"]["size"] == int((L & ~S).sum())
    assert s["flips_wrong_to_right"] == int((~L & F).sum())
    assert s["flips_right_to_wrong"] == int((L & ~F).sum())
    assert s["undetermined"] == 0
    assert curve.right_at(k)[0] == curve.llm_right + s["flips_wrong_to_right"] - s["flips_right_to_wrong"]


@pytest.mark.parametrize("seed", range(3))
def test_probs_curve_equals_brute_force_model_free(seed):
    rng = np.random.default_rng(seed)
    n, c = 2000, 5
    pl = rng.dirichlet(np.full(c, 0.4), n)
    ps = rng.dirichlet(np.full(c, 0.4), n)
    t = rng.integers(0, c, n)
    curve = curve_from_intervals(intervals_from_probs(pl, ps, t))
    for w in W_GRID[::5]:
        k = _k(w)
        assert curve.right_at(k)[0] == brute_force_right(pl, ps, t, k).sum()


def test_exchange_threshold_of_lemma_a23():
    # LLM prefers a (0.6) over the target b (0.4); SLM prefers b (0.9 vs 0.1):
    # the fused model picks b exactly when k < (0.9 - 0.1) / (0.6 - 0.4) = 4
    iv = intervals_from_probs([[0.6, 0.4]], [[0.1, 0.9]], [1])
    assert iv.lo[0] == 0.0 and iv.hi[0] == pytest.approx(4.0)
    curve = curve_from_intervals(iv)
    assert curve.thresholds.tolist() == pytest.approx([4.0])
    assert curve.right_at(3.99) == (1, 1) and curve.right_at(4.01) == (0, 0)
    assert curve.llm_right == 0 and curve.slm_right == 1


def test_ties_go_to_the_lower_index_like_argmax():
    # identical rows: candidates 0 and 1 tie at every k
    pl = np.array([[0.5, 0.5], [0.5, 0.5]])
    curve = curve_from_intervals(intervals_from_probs(pl, pl, [0, 1]))
    for k in (0.0, 0.3, 7.0, math.inf):
        assert curve.right_at(k)[0] == brute_force_right(pl, pl, [0, 1], k).sum() == 1


def test_words_of_several_tokens_are_right_only_when_every_token_is():
    rng = np.random.default_rng(5)
    n, c = 600, 4
    pl, ps = rng.dirichlet(np.ones(c), n), rng.dirichlet(np.ones(c), n)
    t = rng.integers(0, c, n)
    word = np.repeat(np.arange(200), 3)
    curve = curve_from_intervals(combine_groups(intervals_from_probs(pl, ps, t), word))
    assert curve.n == 200
    for w in W_GRID[::20]:
        k = _k(w)
        per_tok = brute_force_right(pl, ps, t, k).reshape(200, 3).all(1)
        assert curve.right_at(k)[0] == per_tok.sum()


def test_one_option_is_a_clear_error():
    with pytest.raises(ArfuseError, match="example 1 has 1 candidate"):
        intervals_from_probs([[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]], [0, 0],
                             valid=[[True, True], [True, False]])
    with pytest.raises(ArfuseError, match="outside"):
        intervals_from_probs([[0.5, 0.5]], [[0.5, 0.5]], [2])


def test_paired_bootstrap_interval():
    base = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    same = paired_bootstrap(base, base)
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0
    fused = base.copy()
    fused[500:530] = True  # 30 fixed, none broken: +3 points, interval strictly above 0
    r = paired_bootstrap(fused, base, n_boot=4000)
    assert r["delta"] == pytest.approx(0.03) and r["fixed"] == 30 and r["broken"] == 0
    assert 0 < r["ci_low"] < 0.03 < r["ci_high"] < 0.05
