"""The segment mixture within multiple-choice options (models with one or two tokenizers)."""
import json

import numpy as np
import pytest

from arfuse.scoring.scorer import ScoreConfig

QUESTIONS = [
    ("Which animal jumps over the lazy dog?", ["the quick brown fox", "a stitch", "nine dogs", "Café naïve"], 0),
    ("What saves nine?", ["a stitch in time", "the word", "résumé — 日本語", "God"], 0),
    ("In the beginning was what?", ["the dog", "the word", "naïve Ω fox"], 1),
    ("Who was with the word?", ["God", "the fox", "brown time"], 0),
    ("What is lazy?", ["the brown word", "the dog", "a stitch in nine", "Café"], 1),
    ("What does the fox do?", ["jumps over", "saves time", "was with God"], 0),
    ("What is quick?", ["the brown fox", "résumé", "the lazy word"], 0),
    ("What is 日本語?", ["a word", "a dog", "a stitch"], 0),
]


@pytest.fixture(scope="module")
def arc_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("arc") / "arc.jsonl"
    lines = []
    for i, (stem, opts, gold) in enumerate(QUESTIONS):
        labels = "ABCD"[:len(opts)]
        lines.append(json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": [
            {"text": t, "label": lab} for t, lab in zip(opts, labels)]}, "answerKey": labels[gold]}))
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _conts(tiny_models, names, arc_file):
    from arfuse.adapters import load_model
    from arfuse.tasks.loglik import score_continuations
    from arfuse.tasks.multiple_choice import read_arc, requests

    ex = read_arc(arc_file)
    pairs = requests(ex)
    models = [load_model(tiny_models[n]) for n in names]
    conts = [score_continuations(m, pairs, ScoreConfig(window=256, stride=128, topk=4), name="arc_test",
                                 progress=False) for m in models]
    return ex, pairs, models, conts


def test_one_tokenizer_segments_are_tokens(tiny_models, arc_file, one_thread):
    """(a) one tokenizer: ll_seg(w) = sum over the option's tokens of log(w p_L + (1 - w) p_S), the
    token log-probs computed here directly from each model's forward pass."""
    import torch

    from arfuse.tasks.loglik import split_pair
    from arfuse.tasks.multiple_choice import option_segments

    ex, pairs, models, conts = _conts(tiny_models, ["large", "small"], arc_file)
    segs = option_segments(conts)
    assert segs.token_level and len(segs) == int(conts[0].n_tokens().sum())
    for w in (0.0, 0.3, 0.85, 1.0):
        got = segs.loglik(w)
        for i, (c, x) in enumerate(pairs):
            c, x = split_pair(c, x)
            ids = [models[0].bos_id] * bool(conts[0].records.meta["bos"]) + list(models[0].encode(c + x).ids)
            n_ctx = len(models[0].encode(c).ids) + bool(conts[0].records.meta["bos"])
            inp = torch.tensor([ids[:-1]])
            tgt = torch.tensor(ids[n_ctx:])
            lp = [m.logprobs(inp)[0, n_ctx - 1:].double().gather(1, tgt[:, None])[:, 0].numpy() for m in models]
            with np.errstate(divide="ignore"):
                want = np.logaddexp(np.log(w) + lp[0], np.log1p(-w) + lp[1]).sum()
            assert got[i] == pytest.approx(want, abs=1e-4)


def test_other_tokenizer_segments_tile_each_option(tiny_models, arc_file, one_thread):
    """(b) two tokenizers: the segments' byte spans tile every option, each boundary ends a token of
    both models, and every model's segment log-probs sum to its whole-option ll."""
    from arfuse.tasks.loglik import split_pair
    from arfuse.tasks.multiple_choice import option_segments

    ex, pairs, models, conts = _conts(tiny_models, ["large", "othervocab"], arc_file)
    segs = option_segments(conts)
    assert not segs.token_level
    assert len(segs) < min(segs.tokens)  # some segments hold several tokens of a model
    for i, (c, x) in enumerate(pairs):
        c, x = split_pair(c, x)
        mine = segs.request == i
        s, e = segs.start[mine], segs.end[mine]
        assert s[0] == 0 and e[-1] == len(x.encode()) and np.array_equal(s[1:], e[:-1]) and np.all(e > s)
        cb = len(c.encode())
        for m in models:  # every boundary ends a token of this model (byte offsets of its token ends)
            enc = m.encode(c + x)
            ends = {len((c + x)[:k].encode()) - cb for k in enc.ends}
            assert set(e.tolist()) <= ends
    for k, c in enumerate(conts):
        np.testing.assert_allclose(segs.model_loglik(k), c.loglik(), rtol=0, atol=1e-9)
    # the mixture at w = 1 and w = 0 is each model alone
    np.testing.assert_allclose(segs.loglik(1.0), conts[0].loglik(), atol=1e-9)
    np.testing.assert_allclose(segs.loglik(0.0), conts[1].loglik(), atol=1e-9)
    mid = segs.loglik(0.5)
    assert np.all(mid >= 0.5 * (conts[0].loglik() + conts[1].loglik()) - 1e-9)  # log is concave, per segment
    # token_ends from the pairs alone (Continuations made without the lengths) agree
    from dataclasses import replace

    bare = replace(conts[1], cont_bytes=None)
    assert np.array_equal(bare.token_ends(pairs), conts[1].token_ends())


def test_task_report_has_both_rows(tiny_models, arc_file, one_thread, capsys):
    """(c) the task report of a pair with different tokenizers carries the whole-option rows and the
    segment mixture's, in the JSON report and in the CLI's Markdown."""
    from arfuse.cli.main import main
    from arfuse.tasks.runner import SEGMENT_ROW, TaskRunConfig, run_task

    rep = run_task(TaskRunConfig(task="arc_easy", large=tiny_models["large"], small=tiny_models["othervocab"],
                                 data=str(arc_file), valid_split="0:3", n_boot=200), progress=False)
    seg = rep["segment_mixture"]
    assert seg["tokenizers"] == "different" and not seg["token_level"]
    for key in ("acc", "acc_norm"):
        assert rep["fused"][key]["test"]["n"] == 5
        f = seg[key]
        assert 0 <= f["w"] <= 1 and f["test"]["n"] == 5
        assert f["test"]["acc_fused"] == pytest.approx(f["test"]["acc_llm"] + f["test"]["delta"])
        assert f["test"]["acc_llm"] == rep["fused"][key]["test"]["acc_llm"]
    assert main(["task", "arc_easy", "--large", tiny_models["large"], "--small", tiny_models["othervocab"],
                 "--data", str(arc_file), "--valid-split", "0:3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| acc | " in out and "| acc_norm | " in out
    assert f"| acc, {SEGMENT_ROW} |" in out and f"| acc_norm, {SEGMENT_ROW} |" in out


def _records(req, nbytes, logp, fp):
    from arfuse.scoring.records import TokenRecords

    n = len(req)
    req = np.asarray(req, np.int32)
    pos = np.concatenate([np.arange(np.sum(req == r)) + 5 for r in np.unique(req)]).astype(np.int32)
    z = np.zeros(n, np.int32)
    return TokenRecords(req, pos, np.arange(n, dtype=np.int32), np.asarray(logp, np.float32), z[:, None], z[:, None].astype(np.float32),
                        np.asarray(nbytes, np.int32), z, z, meta={"tokenizer": fp})


def test_merged_first_token_and_byteless_tokens_on_synthetic_records():
    """A first token that took the context's last byte lands in the first segment; a token closing no
    byte goes with the next one; the spans still tile [0, len) of each continuation string."""
    from arfuse.tasks.loglik import Continuations
    from arfuse.tasks.multiple_choice import option_segments

    # request 0: " ab" (3 bytes); request 1: " é" (3 bytes)
    a = Continuations(_records([0, 0, 1, 1], [3, 1, 1, 2], [-1, -2, -3, -4], "A"), np.array([0, 0, 1, 1]), 2,
                      np.array([3, 3]))  # A: "x a" merged (starts at -1), "b"; " ", "é"
    b = Continuations(_records([0, 0, 1, 1, 1], [1, 2, 1, 0, 2], [-5, -6, -7, -8, -9], "B"),
                      np.array([0, 0, 1, 1, 1]), 2, np.array([3, 3]))  # B: " ", "ab"; " ", <byte>, "é"
    assert a.token_ends().tolist() == [2, 3, 1, 3] and b.token_ends().tolist() == [1, 3, 1, 1, 3]
    s = option_segments([a, b])
    assert not s.token_level and s.start_mismatch.tolist() == [1, 0]
    assert s.request.tolist() == [0, 1, 1] and s.start.tolist() == [0, 0, 1] and s.end.tolist() == [3, 1, 3]
    np.testing.assert_allclose(s.logp, [[-3, -3, -4], [-11, -7, -17]])
    np.testing.assert_allclose(s.loglik(0.25), [np.logaddexp(np.log(.25) - 3, np.log(.75) - 11),
                                                np.logaddexp(np.log(.25) - 3, np.log(.75) - 7)
                                                + np.logaddexp(np.log(.25) - 4, np.log(.75) - 17)])
