"""The cosine-similarity AR variant, per-model decoding state (HF and llama2.c), and the generate CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from arfuse.adapters import load_model
from arfuse.cli.main import main as cli_main
from arfuse.errors import ArfuseError
from arfuse.fusion.cosine import cosine, cosine_target_logprobs, unit_rows
from arfuse.generation.api import generate
from arfuse.generation.state import ModelState


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


# ---- cosine rule (model-free) ------------------------------------------------------------------
def _random_case(seed=0, V=7, D=4, B=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, D, generator=g)
    ll = torch.log_softmax(torch.randn(B, V, generator=g) * 2, -1)
    ls = torch.log_softmax(torch.randn(B, V, generator=g) * 2, -1)
    return emb, ll, ls


def test_cosine_matches_brute_force_with_full_similarity_matrix():
    emb, ll, ls = _random_case()
    e = emb / emb.norm(dim=-1, keepdim=True)
    sim = e @ e.T  # (V, V): only the test builds it
    for p in (0.5, 2.0, 7.0):
        a = ls.argmax(-1)
        unnorm = ll.exp() * ((1 + sim[a]) / 2) ** p
        expected = unnorm / unnorm.sum(-1, keepdim=True)
        got = cosine(ll, ls, unit_rows(emb), p).exp()
        assert torch.allclose(got, expected, atol=1e-6)
        # the SLM's top token gains relative to the LLM (its similarity to itself is 1, the maximum)
        assert ((got / ll.exp()).gather(-1, a[:, None]) >= (got / ll.exp()).max(-1, keepdim=True).values - 1e-5).all()


def test_cosine_power_zero_is_llm_and_inputs_untouched_and_numpy():
    emb, ll, ls = _random_case(1)
    ll0 = ll.clone()
    assert torch.equal(cosine(ll, ls, unit_rows(emb), 0.0), ll)
    assert torch.equal(ll, ll0)
    out_np = cosine(ll.numpy(), ls.numpy(), unit_rows(emb), 1.5)
    assert isinstance(out_np, np.ndarray)
    assert np.allclose(out_np, cosine(ll, ls, unit_rows(emb), 1.5).numpy())
    with pytest.raises(ArfuseError, match="power -1"):
        cosine(ll, ls, unit_rows(emb), -1)


def test_cosine_target_logprobs_for_many_powers():
    emb, ll, ls = _random_case(2, B=5)
    targets = torch.tensor([0, 3, 6, 2, 2])
    powers = [0.0, 0.3, 1.0, 4.0]
    got = cosine_target_logprobs(ll, ls.argmax(-1), targets, unit_rows(emb), powers)  # (5, 4)
    for j, p in enumerate(powers):
        ref = cosine(ll, ls, unit_rows(emb), p).gather(-1, targets[:, None])[:, 0]
        assert torch.allclose(got[:, j], ref, atol=1e-5)


# ---- decoding state: rollback and padding ----------------------------------------------------------
def _check_rollback(model, seq):
    """Feed a prefix, then 3 drafts, keep 1 of them, feed one more: equals a fresh run on the kept text."""
    st = ModelState(model)
    st.feed(torch.tensor([seq[:4]]))
    st.feed(torch.tensor([seq[4:7]]))
    st.rollback(3, torch.tensor([1]))
    got = st.feed(torch.tensor([[seq[9]]]))[0, -1]
    ref = torch.log_softmax(model.forward_logits(torch.tensor([seq[:5] + [seq[9]]]).to(model.device)).float(), -1)[0, -1]
    assert torch.allclose(got, ref, atol=1e-4)


def test_rollback_hf(models):
    _check_rollback(models[0], [5, 17, 30, 41, 52, 63, 74, 85, 96, 107])


def test_rollback_llama2c(shared_data):
    m = load_model(str(shared_data / "models/stories260K/stories260K.bin"))
    _check_rollback(m, [1, 17, 30, 41, 52, 63, 74, 85, 96, 107])


def test_llama2c_greedy_speculative_batched(shared_data):
    """A real pretrained model (stories260K) fused with itself: every draft is accepted and batch = one by one."""
    m = load_model(str(shared_data / "models/stories260K/stories260K.bin"))
    prompts = ["Once upon a time", "The little dog"]
    plain = generate(prompts, large=m, small=m, weight=0.5, max_new_tokens=20)
    spec = generate(prompts, large=m, small=m, weight=0.5, max_new_tokens=20, speculative=4)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert spec[0].stats.acceptance_rate == 1.0
    one = generate(prompts[1], large=m, small=m, weight=0.5, max_new_tokens=20)
    assert one.token_ids == plain[1].token_ids
    assert len(plain[0].text) > 20


# ---- cosine rule in generation -------------------------------------------------------------------
def test_cosine_generation_greedy_and_speculative(models):
    L, S = models
    prompt = "In the beginning was"
    plain = generate(prompt, large=L, small=S, rule="cosine", power=3.0, max_new_tokens=12)
    spec = generate(prompt, large=L, small=S, rule="cosine", power=3.0, max_new_tokens=12, speculative=3)
    assert spec.token_ids == plain.token_ids
    ids = L.encode(prompt).ids
    unit = unit_rows(L.input_embeddings())
    for t in plain.token_ids:  # each token is the argmax of the cosine rule on a full recompute
        x = torch.tensor([ids])
        P = cosine(L.logprobs(x)[0, -1], S.logprobs(x)[0, -1], unit, 3.0)
        assert int(P.argmax()) == t
        ids.append(t)
    with pytest.raises(ArfuseError, match="needs its power"):
        generate(prompt, large=L, small=S, rule="cosine")
    with pytest.raises(ArfuseError, match="unknown fusion rule 'cosin'.*Did you mean 'cosine'"):
        generate(prompt, large=L, small=S, rule="cosin", power=1.0)


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_generate_streams_the_fused_text(models, tiny_models, capsys):
    L, S = models
    rc = cli_main(["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--weight", "0.5",
                   "--max-new-tokens", "9", "--speculative", "2", "--threads", "1", "--stats", "A stitch"])
    out, err = capsys.readouterr()
    assert rc == 0
    ref = generate("A stitch", large=L, small=S, weight=0.5, max_new_tokens=9)
    assert out == "A stitch" + ref.text + "\n"
    assert "9 tokens in" in err and "acceptance" in err


def test_cli_generate_bad_input(tiny_models, capsys):
    base = ["generate", "--large", tiny_models["large"], "--small", tiny_models["small"]]
    assert cli_main(base + ["--weight", "1.5", "x"]) == 2
    assert "weight 1.5 is outside [0, 1]" in capsys.readouterr().err
    assert cli_main(base + ["--weight", "0.5", "--speculative", "0", "x"]) == 2
    assert "speculative g = 0 must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(["generate", "--large", tiny_models["large"], "--small", tiny_models["othervocab"],
                     "--weight", "0.5", "x"]) == 2
    err = capsys.readouterr().err  # the fix names what exists (arfuse.fusion.registry.cross_tokenizer_hint)
    assert "vocabularies differ" in err and "--rule union" in err
    with pytest.raises(SystemExit) as e:  # a prompt right after a bare --speculative is taken for its G
        cli_main(base + ["--weight", "0.5", "--speculative", "A stitch"])
    assert e.value.code == 2 and "write --speculative auto, or put the prompt first" in capsys.readouterr().err
    assert cli_main(base + ["--weight", "0.5", "--draft", "slm", "x"]) == 2
    assert "draft='slm' is a way of speculating" in capsys.readouterr().err


def test_optimal_power_is_the_minimum_of_the_nll():
    from arfuse.fusion.cosine import optimal_power

    g = torch.Generator().manual_seed(3)
    V, D, N = 11, 5, 400
    emb = torch.randn(V, D, generator=g)
    unit = unit_rows(emb)
    ll = torch.log_softmax(torch.randn(N, V, generator=g) * 1.5, -1)
    a = torch.randint(0, V, (N,), generator=g)
    # targets drawn from a cosine-fused distribution at p = 2, so the optimum is near 2 and interior
    slm = torch.log_softmax(torch.eye(V)[a] * 5, -1)  # any SLM whose argmax is a
    true = cosine(ll, slm, unit, 2.0)
    targets = torch.multinomial(true.exp(), 1, generator=g)[:, 0]
    p, nll = optimal_power(ll, a, targets, unit, chunk=64)
    grid = torch.linspace(0, 6, 601)
    nlls = -cosine_target_logprobs(ll, a, targets, unit, grid.tolist()).double().mean(0)
    assert abs(p - grid[nlls.argmin()].item()) <= 0.011
    assert nll <= nlls.min().item() + 1e-6
    assert 1.0 < p < 3.5
