import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arfuse.errors import ArfuseError
from arfuse.scoring.windows import plan_windows


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 400), window=st.integers(2, 64), data=st.data())
def test_every_target_scored_exactly_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    for conv in ("sliding", "disjoint", "blocks"):
        ws = plan_windows(n, window=window, stride=stride, convention=conv)
        targets = [t for w in ws for t in range(w.tgt_start, w.tgt_end)]
        assert targets == list(range(1, n)) if n >= 2 else targets == []
        for w in ws:
            assert 1 <= w.input_len <= window          # never more than the window
            assert w.ctx_start < w.tgt_start            # each target has at least one token of context


def test_sliding_matches_hf_guide_layout():
    # 10 tokens, window 4, stride 2: HF guide windows [0,4) [2,6) [4,8) [6,10)
    ws = plan_windows(10, window=4, stride=2, convention="sliding")
    assert [(w.ctx_start, w.tgt_start, w.tgt_end) for w in ws] == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # context of the second window's first target: tokens 2..3 (window - stride)
    ws = plan_windows(10, window=4, stride=4, convention="sliding")
    assert [(w.ctx_start, w.tgt_start, w.tgt_end) for w in ws] == [(0, 1, 4), (3, 4, 7), (6, 7, 10)]


def test_disjoint_matches_lm_eval_rolling():
    # s[0] is the prefix token: the first window predicts 1..4 from 0..3; then 5..8 from 4..7; the last
    # predicts 9 from a full window read back, 5..8 (lm-eval 0.4.13 cuts it so; the old cut read 8 alone)
    ws = plan_windows(10, window=4, convention="disjoint")
    assert [(w.ctx_start, w.tgt_start, w.tgt_end) for w in ws] == [(0, 1, 5), (4, 5, 9), (5, 9, 10)]
    assert [w.input_len for w in ws] == [4, 4, 4]


def test_blocks_is_nanogpts_validation_cut():
    # consecutive blocks: 1..4 from 0..3, 5..8 from 4..7, 9 from 8 (no prefix token, the last block short)
    ws = plan_windows(10, window=4, convention="blocks")
    assert [(w.ctx_start, w.tgt_start, w.tgt_end) for w in ws] == [(0, 1, 5), (4, 5, 9), (8, 9, 10)]
    assert [w.input_len for w in ws] == [4, 4, 1]


@settings(max_examples=300, deadline=None)
@given(n_text=st.integers(1, 300), window=st.integers(1, 40))
def test_disjoint_is_lm_evals_own_cut(n_text, window):
    """Window for window, the same inputs and targets as lm-eval's get_rolling_token_windows (context_len=1)
    and make_disjoint_window, over a text of n_text tokens after the prefix token."""
    utils = pytest.importorskip("lm_eval.utils")
    prefix, text = -1, list(range(n_text))
    seq = [prefix] + text
    theirs = [(ctx + tgt)[:-1] for ctx, tgt in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        token_list=text, prefix_token=prefix, max_seq_len=window, context_len=1))]
    theirs_tgt = [tgt for _, tgt in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        token_list=text, prefix_token=prefix, max_seq_len=window, context_len=1))]
    ours = plan_windows(len(seq), window=window, convention="disjoint")
    # lm-eval's model reads (context + continuation)[-(window + 1):][:-1]
    assert [seq[w.ctx_start:w.tgt_end - 1] for w in ours] == [x[-window:] for x in theirs]
    assert [seq[w.tgt_start:w.tgt_end] for w in ours] == theirs_tgt


@pytest.mark.parametrize("kw", [dict(window=0), dict(window=4, stride=5), dict(window=4, stride=0),
                                dict(window=4, convention="rolling"), dict(window=1, convention="sliding")])
def test_bad_window_arguments(kw):
    with pytest.raises(ArfuseError):
        plan_windows(10, **kw)
