"""Segment-level ensembling with verification (SpecFuse, ``arfuse.generation.segment``): one model is
its own greedy decoding; batched candidate scores equal each candidate scored alone, from scratch;
the Hedge-weighted ranking, model exit, batching, stops, caches kept across rounds; bad input."""
from __future__ import annotations

import pytest
import torch

from arfuse.errors import ArfuseError
from arfuse.generation.api import generate
from arfuse.generation.config import GenerationConfig
from arfuse.generation.segment import SegmentDecoder

PROMPTS = ["The quick brown fox", "Once upon a time, there", "In the beginning", "A stitch in time"]


@pytest.fixture(scope="module")
def models(tiny_models, one_thread):
    from arfuse.adapters import load_model

    return {k: load_model(tiny_models[k]) for k in ("large", "small", "othervocab")}


def _run(ms, prompts, opts=None, **cfg):
    dec = SegmentDecoder(ms, GenerationConfig(**cfg), **(opts or {}))
    chunks = list(dec.run(prompts))
    return dec, chunks


@pytest.mark.parametrize("L", [1, 4, 10])
def test_one_model_is_its_greedy_decoding(models, L):
    """Each round the single model drafts, cuts at a word end and verifies its own draft: the
    concatenated segments are its greedy tokens, the length limit and EOS included."""
    large = models["large"]
    dec, chunks = _run([large], PROMPTS, {"segment_len": L}, max_new_tokens=30)
    greedy = generate(PROMPTS, large=large, max_new_tokens=30)
    assert [r.token_ids for r in dec.results] == [g.token_ids for g in greedy]
    assert [r.text for r in dec.results] == [g.text for g in greedy]
    assert [r.finish_reason for r in dec.results] == [g.finish_reason for g in greedy]
    assert dec.stats.rounds >= -(-30 // L)
    for i, r in enumerate(dec.results):   # streamed by segment
        assert "".join(c.text for c in chunks if c.index == i) == r.text
    # through the API too
    api = generate(PROMPTS[:2], large=large, max_new_tokens=30, strategy="segment", segment_len=L)
    assert [r.token_ids for r in api] == [g.token_ids for g in greedy[:2]]


@pytest.mark.parametrize("boost", [5.0, 10.0])
def test_eos_ends_the_segment_and_the_text(models, boost):
    """With the LLM's EOS logit raised, greedy decoding ends at EOS after 0-3 tokens on some prompts:
    segments end there too, the same tokens; an EOS candidate that wins ends an ensemble's text."""
    import torch.nn.functional as F

    large = models["large"]
    lin = large.output_layer()
    bias = torch.zeros(lin.out_features)
    bias[large.eos_id] = boost
    kw = {"max_new_tokens": 30, "fast_kernels": False}
    with large.output_replaced(lambda x: F.linear(x, lin.weight, lin.bias) + bias):
        greedy = generate(PROMPTS, large=large, **kw)
        seg = generate(PROMPTS, large=large, strategy="segment", segment_len=6, **kw)
        ens = _LLMWins([large, models["othervocab"]], GenerationConfig(**kw))
        list(ens.run(PROMPTS))
    assert "eos" in {g.finish_reason for g in greedy}
    assert [r.token_ids for r in seg] == [g.token_ids for g in greedy]
    assert [r.finish_reason for r in seg] == [g.finish_reason for g in greedy]
    assert [r.finish_reason for r in ens.results] == [g.finish_reason for g in greedy]
    assert [r.token_ids for r in ens.results] == [g.token_ids for g in greedy]


def _from_scratch(model, prompt_ids: list[int], text: str, scorer: str) -> float:
    """A candidate's score with no cache and no batch: the whole sequence in one plain forward pass."""
    piece = model.encode_piece(text)
    ids = torch.tensor([prompt_ids + piece])
    logits = model.forward_logits(ids).float()[0]
    rows = logits[len(prompt_ids) - 1:-1]                  # the positions that predict the piece
    if scorer != "logit":
        rows = torch.log_softmax(rows, -1)
    got = rows.gather(-1, torch.tensor(piece)[:, None])
    if scorer == "byte":   # the candidate's log-probability per byte of its text
        return got.sum().item() / len(text.encode())
    return got.mean().item()


@pytest.mark.parametrize("scorer", ["logprob", "byte", "logit"])
def test_batched_scores_equal_each_candidate_alone(models, scorer):
    ms = [models["large"], models["othervocab"]]
    prompts = PROMPTS[:3]
    segs = [[" jumps over", " the lazy dog.", " naïve"], [" was a", " word"], [" the word was with God", " é", " A"]]
    dec = SegmentDecoder(ms, GenerationConfig(), scorer=scorer)
    batched = dec.score_segments(prompts, segs)
    for m, model in enumerate(ms):
        for i, p in enumerate(prompts):
            pids = dec.prompt_ids[m][i]
            for c, seg in enumerate(segs[i]):
                alone = SegmentDecoder(ms, GenerationConfig(), scorer=scorer).score_segments([p], [[seg]])[m][0][0]
                assert batched[m][i][c] == pytest.approx(alone, abs=1e-5)
                assert batched[m][i][c] == pytest.approx(_from_scratch(model, pids, seg, scorer), abs=1e-5)


def test_candidates_never_attend_to_each_other(models):
    """A candidate's score does not move when the other candidates of its row change (each is a
    replicated row of its own; padding is masked)."""
    ms = [models["large"], models["othervocab"]]
    dec = SegmentDecoder(ms, GenerationConfig())
    a = dec.score_segments(PROMPTS[:2], [[" the lazy dog", " in"], [" was", " a"]])
    b = dec.score_segments(PROMPTS[:2], [[" the lazy dog", " God and the word and the fox"], [" was", " stitch"]])
    for m in range(2):
        assert a[m][0][0] == pytest.approx(b[m][0][0], abs=1e-6)
        assert a[m][1][0] == pytest.approx(b[m][1][0], abs=1e-6)
        assert a[m][0][1] != pytest.approx(b[m][0][1], abs=1e-3)


def test_ranking_is_the_hedge_weighted_sum(models):
    """The winner of each round maximises sum_m w_m score_m, w_m ∝ exp(-eta * rounds m lost so far)."""
    ms = [models["large"], models["small"]]
    seen = []

    class Spy(SegmentDecoder):
        def _rank(self, row, scores):
            w = super()._rank(row, scores)
            seen.append((list(row.losses), [list(s) for s in scores], w))
            return w

    dec = Spy(ms, GenerationConfig(max_new_tokens=40), hedge_rate=0.7)
    list(dec.run(PROMPTS[:1]))
    assert len(seen) == dec.stats.rounds >= 3
    for losses, scores, w in seen:
        weights = torch.softmax(-0.7 * torch.tensor(losses, dtype=torch.float64), 0)
        fused = (weights[:, None] * torch.tensor(scores, dtype=torch.float64)).sum(0)
        assert w == int(fused.argmax())
    # losses count the rounds a drafter's candidate lost
    log = dec.stats.log[0]
    assert 0 < dec._rows[0].losses[1] == sum(1 for drafters, _, won in log if 1 in drafters and 1 not in won)
    assert dec._rows[0].losses[0] == sum(1 for drafters, _, won in log if 0 not in won)


class _LLMWins(SegmentDecoder):
    """The LLM's candidate always wins: the other model's candidates lose every round they differ."""

    def _rank(self, row, scores):
        return 0


@pytest.mark.parametrize("exit", ["draft", "all"])
def test_a_model_that_keeps_losing_exits(models, exit):
    ms = [models["large"], models["othervocab"]]
    dec = _LLMWins(ms, GenerationConfig(max_new_tokens=48, stop_at_eos=False), patience=2, exit=exit, segment_len=4)
    list(dec.run(PROMPTS[:2]))
    for i, r in enumerate(dec.results):
        log = dec.stats.log[i]
        streak, expected = 0, None
        for k, (drafters, _, won) in enumerate(log, 1):
            if 1 in drafters:
                streak = 0 if 1 in won else streak + 1
                if streak == 2 and expected is None:
                    expected = k
        assert expected is not None and dec.stats.exits[i] == [None, expected]
        after = log[expected:]
        assert after and all(d == (0,) for d, _, _ in after)                      # it drafts no more
        assert all(v == ((0, 1) if exit == "draft" else (0,)) for _, v, _ in after)  # ... and verifies, or not
        n_text = len(dec.fed_ids[1][i])
        if exit == "draft":   # it still reads every winner
            assert ms[1].decode(dec.fed_ids[1][i]) == ms[0].decode(dec.fed_ids[0][i])
        else:                 # it left: its cache stopped at the round it exited
            assert ms[1].decode(dec.fed_ids[1][i]) != ms[0].decode(dec.fed_ids[0][i])
        assert dec.cache_tokens[1][i] == len(dec.prompt_ids[1][i]) + n_text
    assert dec.stats.wins[1] == 0


def test_batch_of_four_equals_one_at_a_time(models):
    ms = [models["large"], models["othervocab"]]
    for cfg in ({"max_new_tokens": 24}, {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 5}):
        dec, _ = _run(ms, PROMPTS, {"patience": 3}, **cfg)
        for i, p in enumerate(PROMPTS):
            one = dict(cfg, seed=cfg.get("seed", 0) + i)   # prompt i samples with seed + i
            alone, _ = _run(ms, [p], {"patience": 3}, **one)
            assert alone.results[0].text == dec.results[i].text
            assert alone.results[0].token_ids == dec.results[i].token_ids
            assert alone.stats.exits[0] == dec.stats.exits[i]


def test_across_tokenizers_each_piece_is_fed_once(models):
    """Large and othervocab: each model's cache holds its prompt and the text's tokens, each once
    (its tokens decode to the text), and re-encoding every round gives the same text for more tokens."""
    ms = [models["large"], models["othervocab"]]
    dec, chunks = _run(ms, PROMPTS[:3], max_new_tokens=40, stop_at_eos=False)
    s = dec.stats
    assert all(r.finish_reason == "length" and len(r.token_ids) == 40 for r in dec.results)
    assert s.new_tokens == 3 * 40 and s.rounds >= 4
    for m, model in enumerate(ms):
        for i, r in enumerate(dec.results):
            fed = dec.fed_ids[m][i]
            assert dec.cache_tokens[m][i] == len(dec.prompt_ids[m][i]) + len(fed)
            assert model.decode(fed).startswith(r.text)   # the last segment may overshoot the limit
        prompts = sum(len(p) for p in dec.prompt_ids[m])
        assert s.fed_tokens[m] == prompts + s.draft_fed[m] + s.verify_fed[m]
    for i, r in enumerate(dec.results):
        assert "".join(c.text for c in chunks if c.index == i) == r.text
        assert dec.fed_ids[0][i][:40] == r.token_ids
    again, _ = _run(ms, PROMPTS[:3], {"reencode": True}, max_new_tokens=40, stop_at_eos=False)
    assert [r.text for r in again.results] == [r.text for r in dec.results]
    assert all(a > 2 * b for a, b in zip(again.stats.fed_tokens, s.fed_tokens))


def test_stop_strings_and_the_length_limit(models):
    ms = [models["large"], models["small"]]
    base, _ = _run(ms, PROMPTS[:2], max_new_tokens=30, stop_at_eos=False)
    text = base.results[0].text
    stop = next(text[k:k + 2] for k in range(5, len(text) - 2)
                if text[k:k + 2].strip() and "\ufffd" not in text[k:k + 2])
    dec, chunks = _run(ms, PROMPTS[:2], max_new_tokens=30, stop_at_eos=False, stop=[stop])
    r = dec.results[0]
    assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]
    assert "".join(c.text for c in chunks if c.index == 0) == r.text
    short, _ = _run(ms, PROMPTS[:2], {"segment_len": 10}, max_new_tokens=3, stop_at_eos=False)
    assert [len(r.token_ids) for r in short.results] == [3, 3]
    assert [r.token_ids for r in short.results] == [r.token_ids[:3] for r in base.results]


def test_bad_input_fails_with_the_fix(models):
    large, small = models["large"], models["small"]
    with pytest.raises(ArfuseError, match="segment length 0"):
        SegmentDecoder([large, small], GenerationConfig(), segment_len=0)
    with pytest.raises(ArfuseError, match="segment length"):
        generate("hi", large=large, small=small, strategy="segment", segment_len=2.5)
    with pytest.raises(ArfuseError, match="at least two models"):
        generate("hi", large=large, strategy="segment", patience=2)
    for eta in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ArfuseError, match="Hedge rate"):
            generate("hi", large=large, small=small, strategy="segment", hedge_rate=eta)
    with pytest.raises(ArfuseError, match="scorer"):
        generate("hi", large=large, small=small, strategy="segment", scorer="prob")
    with pytest.raises(ArfuseError, match="exit"):
        generate("hi", large=large, small=small, strategy="segment", patience=2, exit="none")
    with pytest.raises(ArfuseError, match="patience"):
        generate("hi", large=large, small=small, strategy="segment", patience=0)
    with pytest.raises(ArfuseError, match="no weight"):
        generate("hi", large=large, small=small, strategy="segment", weight=0.5)
    with pytest.raises(ArfuseError, match="--rule union"):
        generate("hi", large=large, small=small, strategy="segment", rule="union", topk=4)
    with pytest.raises(ArfuseError, match="speculative"):
        generate("hi", large=large, small=small, strategy="segment", speculative=2)
    with pytest.raises(ArfuseError, match="strategy='segment'"):
        generate("hi", large=large, small=small, weight=0.5, segment_len=4)
    with pytest.raises(ArfuseError, match="unknown strategy"):
        generate("hi", large=large, small=small, weight=0.5, strategy="segments")


def test_cli(tiny_models, capsys):
    from arfuse.cli.main import main

    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["othervocab"], "--strategy",
                 "segment", "--segment-len", "4", "--patience", "2", "--exit", "all", "--max-new-tokens", "12",
                 "--threads", "1", "--stats", "The quick brown fox"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The quick brown fox") and "12 tokens" in out.err
    assert "segments:" in out.err and "wins: large" in out.err
    for bad, msg in ((["--hedge-rate", "0"], "Hedge rate 0.0 must be a positive number"),
                     (["--segment-len", "0"], "segment length 0 must be"),
                     (["--patience", "2"], "at least two models"),
                     (["--weight", "0.5", "--small", tiny_models["small"]], "takes no weight")):
        assert main(["generate", "--large", tiny_models["large"], "--strategy", "segment", *bad, "hi"]) == 2
        assert msg in capsys.readouterr().err
