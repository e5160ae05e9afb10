"""Fused generation on tiny in-process models: exactness of speculative decoding, batching, stops, streaming."""
from __future__ import annotations

import pytest
import torch

from arfuse.adapters import load_model
from arfuse.errors import ArfuseError
from arfuse.fusion import linear
from arfuse.generation.api import generate
from arfuse.generation.sampling import residual, sample, transform
from arfuse.generation.speculative import accepted_counts

PROMPTS = ["The quick brown", "In the beginning was", "A stitch", "Café naïve résumé and the lazy dog"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


def chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi-square test of counts against probabilities; cells expecting < 5 are pooled."""
    n = observed.sum().double()
    exp = expected_p.double() * n
    big = exp >= min_expected
    obs_c = torch.cat([observed.double()[big], observed.double()[~big].sum().reshape(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    dof = len(obs_c) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2)), dof


# ---- model-free ----------------------------------------------------------------------------
def test_transform_top_k_top_p_temperature():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    lp = p.log()
    assert torch.allclose(transform(lp, top_k=2).exp(), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), atol=1e-6)
    # nucleus 0.8: 0.5 + 0.2 < 0.8, so the third token is needed too
    assert torch.allclose(transform(lp, top_p=0.8).exp(), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    t = transform(lp, temperature=0.5).exp()
    assert torch.allclose(t, p ** 2 / (p ** 2).sum(), atol=1e-6)
    assert transform(lp) is lp and torch.equal(lp, p.log())  # inputs untouched


def test_inverse_cdf_sample_and_residual():
    lp = torch.tensor([[0.1, 0.6, 0.3]]).log().expand(5, 3)
    u = torch.tensor([0.0, 0.0999, 0.1001, 0.69, 0.71], dtype=torch.float64)
    assert sample(lp, u).tolist() == [0, 0, 1, 1, 2]
    P = torch.tensor([[0.5, 0.3, 0.2]]).log()
    q = torch.tensor([[0.2, 0.5, 0.3]]).log()
    assert torch.allclose(residual(P, q).exp(), torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)


def test_verification_follows_target_model_free():
    """Draft from q, accept with min(1, P/q), else draw from (P - q)+: the output is P (chi-square, alpha 0.001)."""
    g = torch.Generator().manual_seed(0)
    P = torch.tensor([0.05, 0.4, 0.3, 0.05, 0.2]).log()
    q = torch.tensor([0.3, 0.1, 0.3, 0.25, 0.05]).log()
    N = 40000
    x = sample(q.expand(N, 5), torch.rand(N, generator=g, dtype=torch.float64))
    n = accepted_counts(x[:, None], q.expand(N, 1, 5), P.expand(N, 1, 5), torch.rand(N, 1, generator=g, dtype=torch.float64))
    res = sample(residual(P[None], q[None]).expand(N, 5), torch.rand(N, generator=g, dtype=torch.float64))
    out = torch.where(n == 1, x, res)
    counts = torch.bincount(out, minlength=5)
    pval, _ = chi2_pvalue(counts, P.exp())
    assert pval > 1e-3
    # acceptance rate is sum_v min(P, q)
    assert abs(n.double().mean().item() - torch.minimum(P.exp(), q.exp()).sum().item()) < 0.01


# ---- exactness on tiny models ---------------------------------------------------------------
@pytest.mark.parametrize("w", [0.3, 0.8])
def test_speculative_greedy_equals_fused_greedy(models, w):
    L, S = models
    plain = generate(PROMPTS, large=L, small=S, weight=w, max_new_tokens=24)
    for g in (1, 3, "auto"):
        spec = generate(PROMPTS, large=L, small=S, weight=w, max_new_tokens=24, speculative=g, draft="slm")
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain], g
        if w == 0.3 and g == 3:
            assert spec[0].stats.accepted > 0  # drafts were accepted, not only resampled
    assert all(len(r.token_ids) == 24 or r.finish_reason == "eos" for r in plain)


def test_fused_greedy_is_argmax_of_mixture(models):
    """Each greedy token is the argmax of w p_L + (1 - w) p_S given the text so far (full recompute)."""
    L, S = models
    r = generate(PROMPTS[1], large=L, small=S, weight=0.6, max_new_tokens=10)
    ids = L.encode(PROMPTS[1]).ids
    for t in r.token_ids:
        x = torch.tensor([ids])
        P = linear([L.logprobs(x)[0, -1], S.logprobs(x)[0, -1]], [0.6, 0.4])
        assert int(P.argmax()) == t
        ids.append(t)


def test_weight_one_matches_transformers_greedy(models):
    """w = 1 is the LLM alone: the KV-cache loop equals transformers' own greedy generate."""
    L, S = models
    ids = torch.tensor([L.encode(PROMPTS[0]).ids])
    ref = L.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = generate(PROMPTS[0], large=L, small=S, weight=1.0, max_new_tokens=16, speculative=2, draft="slm")
    assert ours.token_ids == ref


def _exact_next(L, S, w, ids):
    x = torch.tensor([ids])
    return linear([L.logprobs(x)[0, -1], S.logprobs(x)[0, -1]], [w, 1 - w]).exp()


def assert_first_two_follow_fused(L, S, w, prompt, res):
    """Over many seeded runs of one prompt, the first token and the second (given the most frequent
    first) follow P = w p_L + (1 - w) p_S: chi-square p-value > 0.001 for each."""
    ids = L.encode(prompt).ids
    eos = L.eos_id  # a sampled EOS ends the text: count it as the token it is
    toks = [r.token_ids + ([eos] if r.finish_reason == "eos" else []) for r in res]
    V = L.info.vocab_size
    first = torch.tensor([t[0] for t in toks])
    pval, dof = chi2_pvalue(torch.bincount(first, minlength=V), _exact_next(L, S, w, ids))
    assert dof >= 3 and pval > 1e-3, (pval, dof)
    mode = int(torch.bincount(first).argmax())
    second = torch.tensor([t[1] for t in toks if t[0] == mode and len(t) > 1])
    pval2, dof2 = chi2_pvalue(torch.bincount(second, minlength=V), _exact_next(L, S, w, ids + [mode]))
    assert dof2 >= 2 and pval2 > 1e-3, (pval2, dof2)


def test_speculative_sampling_matches_fused_distribution(models):
    """Over 4,000 seeded runs, the 1st token (draft accepted or resampled) and the 2nd token given the
    most frequent 1st follow P = w p_L + (1 - w) p_S: chi-square p-value > 0.001 for each."""
    L, S = models
    w, N = 0.5, 4000
    prompt = PROMPTS[0]
    res = generate([prompt] * N, large=L, small=S, weight=w, max_new_tokens=3, temperature=1.0, speculative=2, draft="slm", seed=7,
                   draft_head="full")
    assert res[0].stats.accepted > 0 and res[0].stats.accepted < res[0].stats.drafted
    assert_first_two_follow_fused(L, S, w, prompt, res)


def test_speculative_sampling_with_top_k_temperature(models):
    """Temperature and top-k apply to the fused P; the tokens never leave its top-k set."""
    L, S = models
    res = generate([PROMPTS[2]] * 400, large=L, small=S, weight=0.5, max_new_tokens=2, temperature=0.7, top_k=3,
                   speculative=1, draft="slm", seed=1)
    ids = L.encode(PROMPTS[2]).ids
    allowed = set(torch.topk(_exact_next(L, S, 0.5, ids), 3).indices.tolist())
    assert {r.token_ids[0] for r in res} <= allowed


@pytest.mark.parametrize("spec", [None, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_of_four_equals_one_at_a_time(models, spec, temperature):
    L, S = models
    batch = generate(PROMPTS, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                     speculative=spec, draft="slm" if spec else "auto", seed=11)
    for i, p in enumerate(PROMPTS):
        one = generate(p, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                       speculative=spec, draft="slm" if spec else "auto", seed=11 + i)
        assert one.token_ids == batch[i].token_ids
        assert one.text == batch[i].text


# ---- text: stops, streaming ------------------------------------------------------------------
def test_stop_string_and_streaming(models):
    L, S = models
    full = generate(PROMPTS[0], large=L, small=S, weight=0.5, max_new_tokens=30)
    assert len(full.text) > 6
    stop = full.text[4:6]
    cut = full.text[:full.text.find(stop)]
    for spec in (None, 3):
        stream = generate(PROMPTS[0], large=L, small=S, weight=0.5, max_new_tokens=30, stop=[stop],
                          speculative=spec, stream=True)
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == cut == stream.results[0].text
        assert chunks[-1].finish_reason == "stop" and stream.results[0].finish_reason == "stop"
    streamed = list(generate(PROMPTS[:2], large=L, small=S, weight=0.5, max_new_tokens=8, stream=True))
    for i in range(2):
        assert sum(len(c.token_ids) for c in streamed if c.index == i) == 8


def test_top_level_generate_is_exported(models):
    L, S = models
    import arfuse.generation

    assert arfuse.generate is arfuse.generation.generate
    assert arfuse.generate("A", large=L, small=S, weight=0.5, max_new_tokens=3).token_ids == \
        generate("A", large=L, small=S, weight=0.5, max_new_tokens=3).token_ids


# ---- bad input --------------------------------------------------------------------------------
def test_bad_input(models, tiny_models):
    L, S = models
    with pytest.raises(ArfuseError, match=r"weight 1.5 is outside \[0, 1\]"):
        generate("a", large=L, small=S, weight=1.5)
    with pytest.raises(ArfuseError, match=r"speculative g = 0 must be an integer >= 1"):
        generate("a", large=L, small=S, weight=0.5, speculative=0)
    with pytest.raises(ArfuseError, match=r"vocabularies differ \(320 tokens in large vs 300 in othervocab\)"):
        generate("a", large=L, small=load_model(tiny_models["othervocab"]), weight=0.5)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 positions
    with pytest.raises(ArfuseError, match="exceeds .* context of 256 tokens.*truncate='left'"):
        generate(long_prompt, large=L, small=S, weight=0.5, max_new_tokens=8)
    r = generate(long_prompt, large=L, small=S, weight=0.5, max_new_tokens=8, truncate="left")
    assert r.prompt_tokens == 256 - 8 and len(r.token_ids) == 8
    with pytest.raises(ArfuseError, match=r"temperature \(--temperature\) -1"):
        generate("a", large=L, small=S, weight=0.5, temperature=-1)
    with pytest.raises(ArfuseError, match="give the LLM's weight"):
        generate("a", large=L, small=S)


def test_draft_length_follows_acceptance_and_cost():
    """g grows with the acceptance rate, and drafting stops (g = 0, with periodic probes) when it cannot pay."""
    from arfuse.generation.draft_length import DraftLength

    def run(rate, t_draft, t_token):
        d = DraftLength(g_max=8, start=(), probe_every=4)
        for _ in range(40):  # a verifying pass over n tokens takes 0.2 + t_token * n seconds
            g = d.next()
            if g:  # drafting g tokens: g small-model steps
                d.update(int(rate * 100), 100, g, t_draft * g, g + 1, 0.2 + t_token * (g + 1), 0.001)
            else:
                d.update(0, 0, 0, t_draft, 1, 0.2 + t_token, 0.001)
        return d

    good = run(0.9, 0.01, 0.01)
    assert 5 <= good.history[-1] <= 8 and 0 not in good.history[5:]
    # 5% acceptance and costly verification: plain fused decoding (1 / 0.271 s) beats g = 1 (1.05 / 0.322 s)
    poor = run(0.05, 0.02, 0.05)
    tail = poor.history[10:]
    assert tail.count(0) >= len(tail) * 0.7 and max(tail) >= 1  # mostly plain, still probing


def test_draft_length_probes_less_often_while_drafts_lose():
    """Probes double their spacing (4, 8, ..., 64 plain cycles) while drafting keeps losing,
    and drafting comes back when the drafts get good."""
    from arfuse.generation.draft_length import DraftLength

    d = DraftLength(g_max=8, start=(), probe_every=4)

    def cycle(rate):
        g = d.next()
        if g:
            d.update(int(rate * 100), 100, g, 0.02 * g, g + 1, 0.2 + 0.05 * (g + 1), 0.001)
        else:
            d.update(0, 0, 0, 0.02, 1, 0.25, 0.001)

    for _ in range(250):
        cycle(0.05)
    probes = [i for i, g in enumerate(d.history) if g]
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]
    assert gaps[:5] == [4, 8, 16, 32, 64] and all(x == 64 for x in gaps[5:]), gaps
    for _ in range(100):
        cycle(0.9)
    assert 0 not in d.history[-30:]


def test_draft_length_measures_a_plain_step_first():
    """A one-token pass far cheaper than the line through longer passes (as with few-row kernels):
    the chooser measures a plain step at the start, so poor drafts give way to plain decoding, and
    good ones still win; drafting time is measured per g (a fixed cost plus a cost per draft)."""
    from arfuse.generation.draft_length import DraftLength

    def verify(n):
        return 0.065 if n == 1 else 0.085 + 0.002 * n

    def run(rate):
        d = DraftLength(g_max=6)
        for _ in range(40):
            g = d.next()
            if g:
                d.update(int(rate * 100), 100, g, 0.005 + 0.0025 * g, g + 1, verify(g + 1), 0.001)
            else:
                d.update(0, 0, 0, 0.008, 1, verify(1), 0.001)
        return d

    poor = run(0.1)  # g = 1: 1.1 tokens in 0.096 s; plain: 1 token in 0.074 s
    assert poor.history[:3] == [0, 2, 4] and poor.history[3:].count(0) >= 0.7 * len(poor.history[3:])
    good = run(0.8)
    assert min(good.history[3:]) >= 3


# ---- lookup drafting ---------------------------------------------------------------------------
def test_lookup_draft_copies_what_followed_the_longest_recent_match():
    from arfuse.generation.speculative import lookup_draft

    seq = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    assert lookup_draft(seq, 3) == [1, 2, 6]         # "6 7" last occurred before "1 2 6 ..."
    assert lookup_draft(seq, 1) == [1]
    assert lookup_draft([1, 2, 3, 4], 2) == []        # the last token never occurred before
    assert lookup_draft([3, 9, 3], 5) == [9, 3]       # a short tail: fewer than g tokens
    assert lookup_draft([4, 1, 2, 4, 3, 1, 2], 2) == [4, 3]  # the 2-gram "1 2" wins over the 1-gram "2"


REPEAT = "the cat and the dog and the cat and the dog and the cat and the"


@pytest.mark.parametrize("w", [0.3, 0.8])
@pytest.mark.parametrize("draft", ["lookup", "hybrid"])
def test_copy_speculative_greedy_equals_fused_greedy(models, w, draft):
    """Lookup drafts, and hybrid ones (lookup where the text offers a copy, the SLM otherwise)."""
    L, S = models
    prompts = PROMPTS + [REPEAT]
    plain = generate(prompts, large=L, small=S, weight=w, max_new_tokens=24)
    for g in (1, 3, "auto"):
        spec = generate(prompts, large=L, small=S, weight=w, max_new_tokens=24, speculative=g, draft=draft)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain], g
        if draft == "hybrid" and g == 3:  # rows with a copy and rows without share cycles
            assert spec[0].stats.cycles_by_draft.get("slm+copies", 0) > 0, spec[0].stats.cycles_by_draft
        if g == 3 and draft == "lookup":
            assert spec[0].stats.accepted > 0 and spec[0].stats.large_passes < sum(len(r.token_ids) for r in plain)
    if draft == "lookup":  # the LLM alone can speculate on its own text too (no small model needed)
        alone = generate(REPEAT, large=L, max_new_tokens=16)
        assert generate(REPEAT, large=L, max_new_tokens=16, speculative=2, draft="lookup").token_ids == alone.token_ids
        return
    kinds: dict[str, int] = {}
    for i, p in enumerate(prompts):  # one at a time: a row with no copy to make lets the SLM draft
        one = generate(p, large=L, small=S, weight=w, max_new_tokens=24, speculative=2, draft="hybrid")
        assert one.token_ids == plain[i].token_ids
        for k, v in one.stats.cycles_by_draft.items():
            kinds[k] = kinds.get(k, 0) + v
    assert kinds.get("slm", 0) > 0 and kinds.get("lookup", 0) > 0, kinds


def test_lookup_speculative_sampling_matches_fused_distribution(models):
    """Copied drafts are point masses: over 4,000 seeded runs the first two tokens still follow P
    (chi-square p-value > 0.001 for each), and drafts are both accepted and rejected."""
    L, S = models
    w, N = 0.5, 4000
    prompt = REPEAT
    res = generate([prompt] * N, large=L, small=S, weight=w, max_new_tokens=3, temperature=1.0, speculative=2,
                   seed=3, draft="lookup")
    assert 0 < res[0].stats.accepted < res[0].stats.drafted
    assert_first_two_follow_fused(L, S, w, prompt, res)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lookup_batch_of_four_equals_one_at_a_time(models, temperature):
    L, S = models
    prompts = PROMPTS[:3] + [REPEAT]
    batch = generate(prompts, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                     speculative=2, seed=5, draft="lookup")
    for i, p in enumerate(prompts):
        one = generate(p, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                       speculative=2, seed=5 + i, draft="lookup")
        assert one.token_ids == batch[i].token_ids


def test_lookup_bad_input(models):
    L, S = models
    with pytest.raises(ArfuseError, match="draft 'ngram'"):
        generate("a", large=L, small=S, weight=0.5, speculative=2, draft="ngram")
    with pytest.raises(ArfuseError, match="draft='lookup' is a way of speculating"):
        generate("a", large=L, small=S, weight=0.5, draft="lookup")


# ---- hybrid drafting: lookup where the text offers a copy, the SLM otherwise ---------------------
def test_hybrid_speculative_sampling_matches_fused_distribution(models):
    """The first cycle has nothing to copy (the SLM drafts), later ones copy where they can: the
    first two tokens follow P over 4,000 seeded runs (chi-square p-value > 0.001 for each)."""
    L, S = models
    w, N = 0.5, 4000
    prompt = PROMPTS[0]
    res = generate([prompt] * N, large=L, small=S, weight=w, max_new_tokens=3, temperature=1.0, speculative=2,
                   seed=9, draft="hybrid")
    st = res[0].stats
    assert st.cycles_by_draft.get("slm", 0) > 0 and 0 < st.accepted < st.drafted
    assert_first_two_follow_fused(L, S, w, prompt, res)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hybrid_batch_of_four_equals_one_at_a_time(models, temperature):
    """Each row copies or lets the SLM draft by its own text only: with a fixed g, a batch that mixes
    copying rows and SLM-drafted rows gives every row the tokens it gets alone."""
    L, S = models
    prompts = PROMPTS[:3] + [REPEAT]
    batch = generate(prompts, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                     speculative=2, seed=5, draft="hybrid")
    assert batch[0].stats.cycles_by_draft.get("slm+copies", 0) > 0, batch[0].stats.cycles_by_draft
    for i, p in enumerate(prompts):
        one = generate(p, large=L, small=S, weight=0.5, max_new_tokens=12, temperature=temperature,
                       speculative=2, seed=5 + i, draft="hybrid")
        assert one.token_ids == batch[i].token_ids, i


def test_draft_sources_choose_by_measured_acceptance():
    from arfuse.generation.draft_length import DraftSources

    s = DraftSources(decay=0.9)
    assert s.prefers_copy(2) and not s.prefers_copy(0)  # nothing measured: a tie goes to the copy; no match, no copy
    for _ in range(10):
        s.update("slm", 1.0)
        s.update(1, 0.0)
        s.update(3, 1.0)
    assert not s.prefers_copy(1) and s.prefers_copy(3)
    assert not s.prefers_copy(2)  # unmeasured 2-gram copies (prior 1/2) lose to an SLM that was right 10 times
    assert abs(s.rate(1) - 0.9 ** 10 / (0.9 ** 10 * 2 + sum(0.9 ** i for i in range(10)))) < 1e-12


def test_hybrid_lets_a_strong_slm_draft(models):
    """With the LLM itself as the small model its drafts are always right and short copies are not:
    hybrid drafting moves to the SLM, and the output is still the fused greedy text."""
    L, _ = models
    plain = generate(PROMPTS, large=L, small=L, weight=0.5, max_new_tokens=24)
    spec = generate(PROMPTS, large=L, small=L, weight=0.5, max_new_tokens=24, speculative=2)  # draft "auto"
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    by = spec[0].stats.cycles_by_draft
    assert by.get("slm", 0) > by.get("lookup", 0) + by.get("slm+copies", 0), by
    assert spec[0].stats.acceptance_rate > 0.9


def test_hybrid_bad_input(models):
    L, _ = models
    with pytest.raises(ArfuseError, match="needs a small model to draft"):
        generate("a", large=L, speculative=2, draft="hybrid")
    with pytest.raises(ArfuseError, match="draft='hybrid' is a way of speculating"):
        generate("a", large=L, draft="hybrid")
