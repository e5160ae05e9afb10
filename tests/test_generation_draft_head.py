"""The drafter's head restricted to per-row candidate sets (arfuse.generation.draft_head): the output is
still exactly the fused model's, rows stay independent of their batch, and the sets are what they say."""
from __future__ import annotations

import pytest
import torch

import arfuse.generation.draft_head as dh
from arfuse.adapters.base import CausalLM, Encoding, ModelInfo
from arfuse.generation.api import generate
from arfuse.generation.draft_head import DraftHead

from test_generation import PROMPTS, assert_first_two_follow_fused


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


@pytest.fixture
def small_sets(monkeypatch):
    """Sets of a few dozen of the tiny vocabulary's 320 tokens, so that drafts are often restricted."""
    monkeypatch.setattr(dh, "TOP_K", 2)
    monkeypatch.setattr(dh, "PRIOR", 6)


@pytest.mark.parametrize("w", [0.3, 0.8])
def test_greedy_with_candidate_sets_equals_fused_greedy(models, small_sets, w):
    L, S = models
    plain = generate(PROMPTS, large=L, small=S, weight=w, max_new_tokens=24)
    for g in (1, 3, "auto"):
        spec = generate(PROMPTS, large=L, small=S, weight=w, max_new_tokens=24, speculative=g, draft="slm")
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain], g
        st = spec[0].stats
        assert st.draft_head == "candidates"
        assert 0 < st.draft_vocab < L.info.vocab_size  # a strict subset of the vocabulary was scored
        assert st.draft_head_positions > 0 and 0.0 <= st.draft_head_coverage <= 1.0
    full = generate(PROMPTS, large=L, small=S, weight=w, max_new_tokens=24, speculative=3, draft="slm", draft_head="full")
    assert [r.token_ids for r in full] == [r.token_ids for r in plain]
    assert full[0].stats.draft_head == "full" and full[0].stats.draft_head_coverage is None


def test_one_token_prompt_drafts_from_the_whole_vocabulary_first(models, small_sets):
    L, S = models
    plain = generate("a", large=L, small=S, weight=0.5, max_new_tokens=12, bos="never")
    assert plain.prompt_tokens == 1
    spec = generate("a", large=L, small=S, weight=0.5, max_new_tokens=12, bos="never", speculative=2, draft="slm")
    assert spec.token_ids == plain.token_ids


def test_sampling_with_candidate_sets_matches_fused_distribution(models, small_sets):
    """Drafts come from q_C (p_S renormalised on a row's set); verification uses q_C, so the tokens
    still follow P = w p_L + (1 - w) p_S: chi-square p-value > 0.001 over 4,000 seeded runs."""
    L, S = models
    w, N = 0.5, 4000
    prompt = PROMPTS[0]
    res = generate([prompt] * N, large=L, small=S, weight=w, max_new_tokens=2, temperature=1.0, speculative=2, draft="slm", seed=3)
    st = res[0].stats
    assert st.draft_head == "candidates" and 0 < st.accepted < st.drafted and st.draft_vocab < L.info.vocab_size
    assert_first_two_follow_fused(L, S, w, prompt, res)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_do_not_depend_on_their_batch(models, small_sets, temperature):
    """Each row's set is built from its own distributions: batch 4 equals the prompts one at a time."""
    L, S = models
    batch = generate(PROMPTS, large=L, small=S, weight=0.5, max_new_tokens=14, temperature=temperature,
                     speculative=2, draft="slm", seed=5)
    for i, p in enumerate(PROMPTS):
        one = generate(p, large=L, small=S, weight=0.5, max_new_tokens=14, temperature=temperature,
                       speculative=2, draft="slm", seed=5 + i)
        assert one.token_ids == batch[i].token_ids


def test_sets_exact_head_and_spread(models):
    """A row's set holds its first distributions' PRIOR most probable tokens and each one's top_k;
    ``exact`` equals the model's own log-probs; ``spread`` puts set log-probs back in the vocabulary."""
    _, S = models
    head = DraftHead.for_model(S)
    assert head is not None
    head.top_k, head.prior = 2, 5
    V = S.info.vocab_size
    head.start(2)
    assert head.rows.all() and head.size == V  # nothing seen yet: the whole vocabulary
    lp = torch.log_softmax(torch.randn(3, V), -1)
    head.observe([lp, None])
    want = set(torch.topk(torch.logsumexp(lp, 0), 5).indices.tolist()) | set(torch.topk(lp, 2).indices.flatten().tolist())
    assert set(torch.nonzero(head.rows[0]).flatten().tolist()) == want
    assert head.rows[1].all()  # the other row still drafts from everything
    head.observe([None, lp[:1]])
    assert set(torch.nonzero(head.rows[1]).flatten().tolist()) == set(torch.topk(lp[0], 5).indices.tolist())
    assert set(head.idx.tolist()) == set(torch.nonzero(head.rows.any(0)).flatten().tolist())

    ids = torch.tensor([S.encode("The quick brown fox").ids])
    with torch.no_grad(), head.drafting():
        sub = S.forward_logits(ids.expand(2, -1))  # (2, T, |union|)
    assert torch.isinf(sub[1][:, ~head.rows[1][head.idx]]).all()  # outside row 1's own set: -inf
    ref = torch.log_softmax(S.forward_logits(ids).float(), -1)
    assert torch.allclose(head.exact()[:1], ref, atol=1e-5)
    spread = head.spread(torch.log_softmax(sub[:, -1], -1))
    assert torch.isinf(spread[0, ~head.rows[0]]).all()
    assert torch.allclose(spread[0].exp().sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(spread[0, head.rows[0]], torch.log_softmax(ref[0, -1, head.rows[0]], -1), atol=1e-4)


class _Toy(CausalLM):
    """A model-free causal LM: an embedding, then ``forward`` of its module; its output layer is ``lm_head``."""

    def __init__(self, module):
        self.module = module
        self.info = ModelInfo("toy", "toy", 0, module.lm_head.out_features, None)

    def encode(self, text):
        return Encoding([], [])

    def decode(self, ids):
        return ""

    def tokenizer_fingerprint(self):
        return "toy"

    def forward_logits(self, input_ids, attention_mask=None):
        return self.module(input_ids)

    def network(self):
        return self.module

    def output_layer(self):
        return self.module.lm_head


class _Head(torch.nn.Module):
    def __init__(self, vocab: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.emb = torch.nn.Embedding(vocab, 4)
        self.lm_head = torch.nn.Linear(4, vocab, bias=False)

    def forward(self, input_ids):
        return self.scale * self.lm_head(self.emb(input_ids))


def test_models_whose_logits_are_not_the_output_layer_keep_the_whole_head():
    """A probe compares the logits with the output layer's product: scaled logits fail it."""
    scaled = _Toy(_Head(10, scale=2.0))
    assert DraftHead.for_model(scaled) is None
    scaled.module.scale = 1.0
    assert DraftHead.for_model(scaled) is not None
    assert "forward" not in scaled.module.lm_head.__dict__  # the probe put the layer back as it was
    plain = _Toy(_Head(10))
    plain.output_layer = lambda: None  # no output layer to find
    assert DraftHead.for_model(plain) is None


def test_a_head_with_repeated_rows_drafts_whole_when_the_kernels_compute_them_once():
    """A compact-vocabulary head (most rows shared, as arfuse train exports) is cheap with the
    generation kernels: no candidate set then; without the kernels it still gets one."""
    compact = _Head(9000)
    with torch.no_grad():
        compact.lm_head.weight[100:] = compact.lm_head.weight[99]  # 8,901 rows share one
    model = _Toy(compact)
    assert DraftHead.for_model(model, shared_rows_once=True) is None
    assert DraftHead.for_model(model) is not None
