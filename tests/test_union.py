"""The top-k union rule across tokenizers (UniTE): generation with every model's own tokens and KV
cache, its equality with the linear rule on one tokenizer, and its errors."""
from __future__ import annotations

import pytest
import torch

from arfuse.errors import ArfuseError
from arfuse.generation.api import build_rule, generate
from arfuse.generation.config import GenerationConfig
from arfuse.generation.union import UnionDecoder

PROMPTS = ["The quick brown fox", "Once upon a time, there", "In the beginning"]


def test_union_with_k_covering_the_vocabulary_is_the_linear_rule(tiny_pair):
    large, small = tiny_pair
    kw = dict(large=large, small=small, weight=0.6, max_new_tokens=24)
    lin = generate(PROMPTS, rule="linear", **kw)
    uni = generate(PROMPTS, rule="union", topk=large.info.vocab_size, **kw)
    assert [r.text for r in uni] == [r.text for r in lin]
    assert [r.token_ids for r in uni] == [r.token_ids for r in lin]
    assert [r.finish_reason for r in uni] == [r.finish_reason for r in lin]


@pytest.fixture(scope="module")
def cross_pair(tiny_models):
    from arfuse.adapters import load_model

    return load_model(tiny_models["large"]), load_model(tiny_models["othervocab"])


def _run(models, prompts, **cfg):
    rule = build_rule(models, rule="union", weight=0.5, topk=cfg.pop("topk", 5))
    dec = UnionDecoder(models, rule, GenerationConfig(**cfg))
    chunks = list(dec.run(prompts))
    return dec, chunks


def test_each_generated_piece_is_fed_once(cross_pair):
    """128 union-rule steps: every model is fed its prompt and then only the tokens of each new
    piece, never a prefix again, and those tokens decode to exactly the generated text."""
    dec, chunks = _run(list(cross_pair), PROMPTS[:2], max_new_tokens=128, stop_at_eos=False)
    assert all(len(r.text) > 0 for r in dec.results)
    assert dec.stats.new_tokens == 2 * 128
    for m, model in enumerate(cross_pair):
        fed = sum(len(p) for p in dec.prompt_ids[m]) + sum(len(e.fed_ids) for e in dec.extenders[m])
        assert dec.fed_tokens[m] + dec.unfed[m] == fed
        assert 0 < dec.unfed[m] <= 2 * 4
        for i, r in enumerate(dec.results):
            ext = dec.extenders[m][i]
            assert ext.pending == b""
            assert model.decode(ext.fed_ids) == r.text
    # the streamed chunks are the results' text
    for i, r in enumerate(dec.results):
        assert "".join(c.text for c in chunks if c.index == i) == r.text


def test_batched_equals_one_at_a_time(cross_pair):
    dec, _ = _run(list(cross_pair), PROMPTS, max_new_tokens=20)
    alone = [_run(list(cross_pair), [p], max_new_tokens=20)[0].results[0].text for p in PROMPTS]
    assert [r.text for r in dec.results] == alone


def test_sampling_is_reproducible_and_stops(cross_pair):
    a, _ = _run(list(cross_pair), PROMPTS[:2], max_new_tokens=16, temperature=1.0, seed=3)
    b, _ = _run(list(cross_pair), PROMPTS[:2], max_new_tokens=16, temperature=1.0, seed=3)
    assert [r.text for r in a.results] == [r.text for r in b.results]
    stop = a.results[0].text[3:6]
    if stop.strip():
        c, _ = _run(list(cross_pair), PROMPTS[:1], max_new_tokens=16, temperature=1.0, seed=3, stop=[stop])
        assert c.results[0].finish_reason == "stop" and stop not in c.results[0].text


def test_the_retokenizing_loop_gives_the_same_greedy_text(cross_pair):
    """UniTE's loop (the second model re-reads the whole text, re-tokenized) differs only where the
    piecewise tokens differ from the whole text's; the LLM's side and the bookkeeping are the same."""
    models = list(cross_pair)
    rule = build_rule(models, rule="union", weight=1.0, topk=5)
    a = UnionDecoder(models, rule, GenerationConfig(max_new_tokens=12))
    b = UnionDecoder(models, rule, GenerationConfig(max_new_tokens=12), retokenize=True)
    list(a.run(PROMPTS[:2])), list(b.run(PROMPTS[:2]))
    assert [r.text for r in a.results] == [r.text for r in b.results]   # w = 1: the SLM has no say
    assert b.fed_tokens[1] > a.fed_tokens[1]


def test_errors_name_the_fix(cross_pair, tiny_pair):
    large, other = cross_pair
    with pytest.raises(ArfuseError, match="--rule union"):
        generate("hi", large=large, small=other, weight=0.5, rule="linear", max_new_tokens=2)
    with pytest.raises(ArfuseError, match="topk"):
        generate("hi", large=large, small=other, weight=0.5, rule="union", topk=0, max_new_tokens=2)
    with pytest.raises(ArfuseError, match="speculative"):
        generate("hi", large=large, small=other, weight=0.5, rule="union", speculative=2, max_new_tokens=2)
    with pytest.raises(ArfuseError, match="topk"):
        generate("hi", large=large, small=other, weight=0.5, rule="union", topk=2.5, max_new_tokens=2)


def test_union_probs_renormalise_over_the_union():
    from arfuse.fusion.union import EOS, Vocab, union_probs

    a = Vocab("a", [b" the", b" cat", b"s", None], lambda t: [0] if t.startswith(" t") else [2], eos_id=3)
    b = Vocab("b", [b" th", b" cat", b"e", b"s"], lambda t: [0] if t.startswith(" th") else [3])
    la = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    lb = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1]]))
    keys, q = union_probs([la, lb], [a, b], 1)
    assert keys == [[b" the", b" th"]]
    # model a: " the" exact 0.5; " th" is no token of a: its first sub-token " the" (route) -> 0.5
    assert torch.allclose(q[0, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # model b: " the" routes to its first sub-token " th" (0.6); " th" exact 0.6
    assert torch.allclose(q[1, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    keys, q = union_probs([la, lb], [a, b], 4)
    assert EOS in keys[0] and set(keys[0]) == {b" the", b" cat", b"s", EOS, b" th", b"e"}
    assert torch.allclose(q.sum(-1), torch.ones(2, 1, dtype=torch.float64))


def test_cli_generate_rule_union(tiny_models, capsys):
    from arfuse.cli.main import main

    args = ["generate", "--large", tiny_models["large"], "--small", tiny_models["othervocab"], "--rule", "union",
            "--weight", "0.7", "--topk", "3", "--max-new-tokens", "6", "--json", "The quick brown fox"]
    assert main(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    res = out[0] if isinstance(out, list) else out
    assert res["text"] and res["finish_reason"] == "length"
    assert main([*args[:-2], "--topk", "0", "x"]) == 2
    assert "topk" in capsys.readouterr().err
