"""LSTM and GRU small models (trained in-process by arfuse train, loaded from their checkpoints) fused
with the tiny Llama models that share their tokenizer; and every StepState: rollback and select give
the log-probs of feeding the kept tokens from scratch."""
from __future__ import annotations

import pytest
import torch

from arfuse.adapters import load_model
from arfuse.adapters.base import CausalLM, RerunState
from arfuse.adapters.rnn import RNNStepState
from arfuse.fusion import linear
from arfuse.generation.api import generate

from conftest import TRAIN_TEXT
from test_generation import PROMPTS, REPEAT

pytestmark = pytest.mark.usefixtures("one_thread")

# different lengths; "A" is one token: its row has nothing to prefill beside longer prompts
BATCH = PROMPTS + [REPEAT, "A"]


@pytest.fixture(scope="module")
def rnns(tiny_models, tmp_path_factory) -> dict[str, CausalLM]:
    """A 2-layer LSTM and a 1-layer GRU on the tiny models' tokenizer, 200 steps on their text (~1 s each)."""
    from arfuse.train import TrainConfig, train

    root = tmp_path_factory.mktemp("rnn")
    (root / "train.txt").write_text(TRAIN_TEXT)
    (root / "valid.txt").write_text(TRAIN_TEXT[:400])
    out = {}
    with pytest.MonkeyPatch.context() as mp:  # the per-test cache is not set up yet at module scope
        mp.setenv("ARFUSE_CACHE", str(root / "cache"))
        for cell, layers in (("lstm", 2), ("gru", 1)):
            cfg = TrainConfig.resolve(dict(arch=cell, data=str(root / "train.txt"), valid=str(root / "valid.txt"),
                                           tokenizer=tiny_models["large"], n_layers=layers, embed_size=24,
                                           hidden_size=32, block_size=16, batch_size=8, max_steps=200, lr=2e-2,
                                           dropout=0.0, tie_weights=False, threads=1, eval_every=200,
                                           out=str(root / cell)))
            res = train(cfg, progress=False, log=lambda *a, **k: None)
            out[cell] = load_model(str(res.path), reuse=False)
    return out


@pytest.fixture(scope="module")
def llm(tiny_models):
    return load_model(tiny_models["large"])


def _fresh(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """Next-token log-probs after ``tokens``, computed from nothing."""
    return torch.log_softmax(model.forward_logits(torch.tensor([tokens]).to(model.device)).float(), -1)[0, -1].cpu()


def _lp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).cpu()


def check_step_state(model: CausalLM, a: list[int], b: list[int], drafts: list[int], atol: float = 1e-4) -> None:
    """Prefill rows a and b (left-padded), feed 3 drafts in one call and 1 more in another, take back
    all 4 from row 0 and the last one from row 1; then select row 1 alone."""
    width = max(len(a), len(b))
    ids = torch.tensor([[0] * (width - len(a)) + a, [0] * (width - len(b)) + b])
    mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a), [0] * (width - len(b)) + [1] * len(b)])
    logits, state = model.forward_step(ids, None, mask)
    assert torch.allclose(_lp(logits[1, -1]), _fresh(model, b), atol=atol)
    _, state = model.forward_step(torch.tensor([drafts[:3]] * 2), state)
    _, state = model.forward_step(torch.tensor([drafts[3:4]] * 2), state)
    state.rollback(4, torch.tensor([0, 3]))
    x, y = 7, 11
    logits, state = model.forward_step(torch.tensor([[x], [x]]), state)
    assert torch.allclose(_lp(logits[0, -1]), _fresh(model, a + [x]), atol=atol)
    assert torch.allclose(_lp(logits[1, -1]), _fresh(model, b + drafts[:3] + [x]), atol=atol)
    state.select(torch.tensor([1]))
    logits, state = model.forward_step(torch.tensor([[y]]), state)
    assert logits.shape[0] == 1
    assert torch.allclose(_lp(logits[0, -1]), _fresh(model, b + drafts[:3] + [x, y]), atol=atol)


A, B, DRAFTS = [5, 17, 30, 41, 52, 63, 74], [9, 40, 3], [85, 96, 107, 12]


class _NoCache(CausalLM):
    """A model without its own forward_step: the default reruns whole sequences (RerunState)."""

    def __init__(self, inner: CausalLM):
        self.inner, self.info, self.device = inner, inner.info, inner.device

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def tokenizer_fingerprint(self):
        return self.inner.tokenizer_fingerprint()

    def forward_logits(self, input_ids, attention_mask=None):
        return self.inner.forward_logits(input_ids, attention_mask)


def test_step_state_hf(llm):
    check_step_state(llm, A, B, DRAFTS)


def test_step_state_rerun_fallback(llm):
    model = _NoCache(llm)
    assert isinstance(model.forward_step(torch.tensor([[1, 2]]))[1], RerunState)
    check_step_state(model, A, B, DRAFTS)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_state_rnn(rnns, cell):
    m = rnns[cell]
    assert isinstance(m.forward_step(torch.tensor([[1, 2]]))[1], RNNStepState)
    check_step_state(m, A, B, DRAFTS)
    # a long left-padded feed runs row by row: a padded position leaves the state as it was
    long_a = (A * 12)[:70]
    check_step_state(m, long_a, B, DRAFTS)


def test_step_state_rnn_refuses_a_rollback_it_cannot_make(rnns):
    from arfuse.errors import ArfuseError

    m = rnns["gru"]
    _, state = m.forward_step(torch.tensor([list(range(3, 80))]))  # longer than RECORD_MAX: one call
    with pytest.raises(ArfuseError, match="draft fewer tokens"):
        state.rollback(2, torch.tensor([1]))


def test_step_state_llama2c(shared_data):
    m = load_model(str(shared_data / "models/stories260K/stories260K.bin"))
    check_step_state(m, [1] + A[1:], [1] + B[1:], DRAFTS)


def test_input_embeddings_and_output_layers(llm, rnns):
    assert llm.input_embeddings().shape == (320, 48)
    for m in rnns.values():
        assert m.input_embeddings().shape == (320, 24)
        lin = m.output_layer()
        assert type(lin) is torch.nn.Linear and lin.out_features == 320


# ---- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_fused_greedy_is_argmax_of_mixture(llm, rnns, cell):
    """Each greedy token is the argmax of w p_L + (1 - w) p_RNN on a full recompute, and the RNN has a say."""
    R = rnns[cell]
    r = generate(PROMPTS[1], large=llm, small=R, weight=0.4, max_new_tokens=12)
    ids = llm.encode(PROMPTS[1]).ids
    for t in r.token_ids:
        x = torch.tensor([ids])
        P = linear([llm.logprobs(x)[0, -1], R.logprobs(x)[0, -1]], [0.4, 0.6])
        assert int(P.argmax()) == t
        ids.append(t)
    alone = generate(BATCH, large=llm, max_new_tokens=12)
    fused = generate(BATCH, large=llm, small=R, weight=0.4, max_new_tokens=12)
    assert [a.token_ids for a in alone] != [f.token_ids for f in fused]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_speculative_greedy_equals_fused_greedy(llm, rnns, cell):
    R = rnns[cell]
    plain = generate(BATCH, large=llm, small=R, weight=0.4, max_new_tokens=20)
    for draft in ("slm", "lookup", "hybrid"):
        for g in (1, 3, "auto"):
            spec = generate(BATCH, large=llm, small=R, weight=0.4, max_new_tokens=20, speculative=g, draft=draft)
            assert [r.token_ids for r in spec] == [r.token_ids for r in plain], (draft, g)
            if g == 3:
                assert spec[0].stats.accepted > 0, draft
    head = generate(BATCH, large=llm, small=R, weight=0.4, max_new_tokens=20, speculative=3, draft="slm")
    assert head[0].stats.draft_head == "candidates"  # the RNN's decoder is its capturable output layer


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("spec, draft", [(None, "auto"), (2, "slm"), (2, "hybrid"), (3, "lookup")])
def test_rnn_batch_with_rows_finishing_at_different_times(llm, rnns, cell, spec, draft):
    """A stop string ends some rows early: the rows left go on in a smaller batch, each with the
    tokens it gets alone."""
    R = rnns[cell]
    kw = dict(large=llm, small=R, weight=0.4, max_new_tokens=16, speculative=spec, draft=draft)
    first = generate(BATCH[0], **kw)
    stop = first.text[3:6]
    batch = generate(BATCH, stop=[stop], **kw)
    reasons = {r.finish_reason for r in batch}
    assert "stop" in reasons and "length" in reasons, reasons
    assert len({len(r.token_ids) for r in batch}) > 1
    for p, r in zip(BATCH, batch):
        one = generate(p, stop=[stop], **kw)
        assert one.token_ids == r.token_ids and one.finish_reason == r.finish_reason


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("spec, draft", [(None, "auto"), (2, "slm"), (2, "hybrid"), (2, "lookup")])
def test_rnn_sampling_with_a_seed_is_the_same_alone_and_batched(llm, rnns, cell, spec, draft):
    R = rnns[cell]
    kw = dict(large=llm, small=R, weight=0.4, max_new_tokens=12, temperature=1.0, speculative=spec, draft=draft)
    batch = generate(BATCH, seed=5, **kw)
    assert len({tuple(r.token_ids) for r in batch}) > 1
    for i, p in enumerate(BATCH):
        assert generate(p, seed=5 + i, **kw).token_ids == batch[i].token_ids, i


def test_cosine_rule_on_the_rnn_embeddings(llm, rnns):
    """The cosine rule takes its similarities from the RNN's own input embeddings (``input_embeddings``)."""
    R = rnns["gru"]
    kw = dict(large=llm, small=R, rule="cosine", power=2.0, embeddings="small", max_new_tokens=10)
    plain = generate(PROMPTS[0], **kw)
    assert generate(PROMPTS[0], speculative=3, draft="slm", **kw).token_ids == plain.token_ids
    assert torch.equal(R.input_embeddings(), R.network().encoder.weight)
