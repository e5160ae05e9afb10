"""Continuation of held-out text (``arfuse.tasks.continuation``): chrF's ends of the scale; passages
cut at word boundaries from contiguous text; the true continuation's NLL equals scoring the whole
sequence directly, padded or not; a strategy's run and its segment summary."""
from __future__ import annotations

import math

import pytest
import torch

from arfuse.data.text import Dataset
from arfuse.errors import ArfuseError
from arfuse.tasks.continuation import (chrf, continuation_ids, continuation_nll, continuation_passages,
                                       run_continuations, segment_summary)

VERSES = "\n".join(
    f"  {i} And the word of the Lord came unto the prophet in the days of the king, saying, number {i} is "
    f"written here; the quick brown fox jumps over the lazy dog, and a stitch in time saves nine."
    for i in range(1, 60))


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset("verses", [VERSES[:len(VERSES) // 2], VERSES[len(VERSES) // 2:]], "test")


@pytest.fixture(scope="module")
def models(tiny_models, one_thread):
    from arfuse.adapters import load_model

    return {k: load_model(tiny_models[k]) for k in ("large", "small", "othervocab")}


def test_chrf_identical_and_disjoint():
    refs = ["In the beginning was the word.", "And the light shineth in darkness."]
    same = chrf(refs, refs)
    assert same.corpus == pytest.approx(100.0)
    assert same.per_passage == pytest.approx([100.0, 100.0]) and same.mean == pytest.approx(100.0)
    far = chrf(["xq zzv kkj", "0123 9876 555"], refs)
    assert far.corpus < 5 and max(far.per_passage) < 5
    half = chrf([refs[0], "0123 9876 555"], refs)
    assert far.corpus < half.corpus < 100 and half.per_passage[0] == pytest.approx(100.0)
    with pytest.raises(ArfuseError):
        chrf(["a"], ["a", "b"])


def test_passages_are_contiguous_and_cut_at_word_boundaries(data):
    text = "\n".join(data.documents)
    ps = continuation_passages(data, 6, prompt_chars=120, cont_chars=80)
    assert len(ps) == 6 and len({p.start for p in ps}) == 6
    for p in ps:
        assert text[p.start:p.end] == p.prompt + p.continuation           # contiguous text of the data set
        assert p.start == 0 or text[p.start - 1] == "\n"                  # from a line start
        assert p.prompt.lstrip().split(" ")[0].isdigit()                  # a numbered verse
        assert len(p.prompt) <= 120 and not p.prompt[-1].isspace()
        assert text[p.start + len(p.prompt)] == " "                       # the prompt ends at a word boundary
        assert p.continuation.startswith(" ") and len(p.continuation) <= 80
        assert p.end == len(text) or text[p.end].isspace()                # so does the continuation


def test_passages_of_so_many_tokens(data, models):
    large = models["large"]
    text = "\n".join(data.documents)
    ps = continuation_passages(data, 4, prompt_chars=100, model=large, cont_tokens=7)
    for p in ps:
        assert text[p.start:p.end] == p.prompt + p.continuation
        rest = text[p.start + len(p.prompt):p.start + len(p.prompt) + 400]
        assert large.encode_piece(p.continuation) == large.encode_piece(rest)[:7]
    with pytest.raises(ArfuseError):
        continuation_passages(data, 2, model=large)


def test_nll_equals_scoring_the_concatenation(models):
    """One batched, right-padded pass gives each passage the NLL that scoring its whole sequence
    alone gives; for a prompt cut at a word boundary the sequence is the tokenization of the
    concatenated text."""
    prompts = ["The quick brown fox jumps over the", "In the beginning", "A stitch in time saves nine. The quick"]
    conts = [" lazy dog.", " was the word, and the word was with God.", " brown fox"]
    for name in ("large", "othervocab"):
        m = models[name]
        got = continuation_nll(m, prompts, conts, batch_size=3)
        one = continuation_nll(m, prompts, conts, batch_size=1)
        for i, (p, c) in enumerate(zip(prompts, conts)):
            seq, at = continuation_ids(m, p, c)
            pre = [m.bos_id] if m.uses_bos("auto") else []
            assert seq == pre + m.encode(p + c).ids
            lp = m.logprobs(torch.tensor([seq]))[0]
            direct = -sum(float(lp[t - 1, seq[t]]) for t in range(at, len(seq)))
            assert got.nll[i] == pytest.approx(direct, rel=1e-4, abs=1e-4)
            assert one.nll[i] == pytest.approx(direct, rel=1e-4, abs=1e-4)
            assert got.tokens[i] == len(seq) - at and got.nbytes[i] == len(c.encode())
        assert got.bits_per_byte == pytest.approx(sum(got.nll) / math.log(2) / sum(got.nbytes))
        assert got.nats_per_token == pytest.approx(sum(got.nll) / sum(got.tokens))


def test_run_and_segment_summary(models):
    from arfuse.generation.api import generate

    prompts = ["The quick brown fox", "In the beginning", "A stitch in time"]
    run = run_continuations(lambda ps: generate(ps, large=models["large"], small=models["othervocab"],
                                                strategy="segment", segment_len=4, patience=1,
                                                max_new_tokens=8, stop_at_eos=False), prompts, 2)
    assert len(run.texts) == 3 and len(run.stats) == 2 and run.tokens == 24 and run.tok_s > 0
    s = segment_summary(run.stats)
    assert s["prompts"] == 3 and s["rounds"] == sum(sum(st.prompt_rounds) for st in run.stats)
    for ms in s["models"].values():
        assert 0 <= ms["won_alone"] <= ms["won"] <= 1
    # every decided round has a winner: the models' shares of wins add up to at least 1
    assert sum(ms["won"] for ms in s["models"].values()) >= 1 - 1e-9
    assert s["tokens_per_round"] == pytest.approx(24 / s["rounds"])
