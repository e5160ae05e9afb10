"""Task readers, lm-eval's metric definitions, the task runner and its errors."""
import json
import math

import numpy as np
import pytest

from arfuse.errors import ArfuseError
from arfuse.tasks.configs import available, load_task
from arfuse.tasks.lambada import read_lambada
from arfuse.tasks.multiple_choice import mc_scores, read_arc, read_cbt

CONTEXT = [f"{i} The cat saw {i} dogs ." for i in range(1, 21)]


def _cbt_example(query="21 The XXXXX sat on the mat .\tcat\t\tcat|dog|mat", context=CONTEXT) -> str:
    return "\n".join(context + [query]) + "\n\n"


def test_cbt_reader_on_a_file_in_the_cbt_format(tmp_path):
    p = tmp_path / "cbt.txt"
    p.write_text(_cbt_example() + _cbt_example("21 A dog saw the XXXXX .\tmat\t\tcat|dog|mat"))
    ex = read_cbt(p)
    assert len(ex) == 2
    assert ex[0].options == ["cat sat on the mat .", "dog sat on the mat .", "mat sat on the mat ."]
    assert ex[0].gold == 0 and ex[1].gold == 2
    assert ex[0].context.startswith("The cat saw 1 dogs . The cat saw 2") and ex[0].context.endswith("saw 20 dogs . The ")
    assert ex[1].options[2] == "mat ."


@pytest.mark.parametrize("query, message", [
    ("21 The XXXXX sat .\tcat\tcat|dog", "bad.txt:21: the query line needs"),
    ("21 The XXXXX sat .\tcat\t\tcat", "bad.txt:21: 1 candidate: multiple choice needs at least 2"),
    ("21 The XXXXX sat .\tbird\t\tcat|dog", "bad.txt:21: the answer 'bird' is not among"),
    ("21 The cat sat .\tcat\t\tcat|dog", "bad.txt:21: the query must hold XXXXX"),
])
def test_cbt_malformed_query_line_names_the_line(tmp_path, query, message):
    p = tmp_path / "bad.txt"
    p.write_text(_cbt_example(query))
    with pytest.raises(ArfuseError, match=message):
        read_cbt(p)


def test_cbt_malformed_context_line_names_the_line(tmp_path):
    lines = CONTEXT.copy()
    lines[6] = "Sentence without its number"
    p = tmp_path / "bad.txt"
    p.write_text(_cbt_example(context=lines))
    with pytest.raises(ArfuseError, match=r"bad.txt:7: a CBT line starts with its number"):
        read_cbt(p)


def test_arc_reader_on_the_shared_file_and_its_errors(shared_data, tmp_path):
    ex = read_arc(shared_data / "mc/arc/ARC-Easy-Test.jsonl", limit=5)
    assert ex[0].context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:")
    assert ex[0].options[0] == " Sunlight is the source of energy for nearly all ecosystems." and ex[0].gold == 0
    assert len(read_arc(shared_data / "mc/arc/ARC-Challenge-Test.jsonl")) == 1172
    good = (shared_data / "mc/arc/ARC-Easy-Test.jsonl").read_text().splitlines()[:3]
    one = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}
    p = tmp_path / "arc.jsonl"
    p.write_text("\n".join(good + [json.dumps(one)]) + "\n")
    with pytest.raises(ArfuseError, match=r"arc.jsonl:4: question 'x' has 1 option: multiple choice needs at least 2"):
        read_arc(p)
    p.write_text("\n".join(good[:2] + ["{not json"]) + "\n")
    with pytest.raises(ArfuseError, match=r"arc.jsonl:3: not valid JSON"):
        read_arc(p)


def test_lambada_reader_matches_lm_eval_split_and_names_bad_lines(shared_data, tmp_path):
    ex = read_lambada(shared_data / "text/lambada/lambada_test.jsonl", limit=3)
    text = json.loads((shared_data / "text/lambada/lambada_test.jsonl").open().readline())["text"]
    assert ex[0].context + ex[0].target == text and ex[0].target == " signs"
    p = tmp_path / "l.jsonl"
    p.write_text('{"text": "a b c"}\n{"txt": "oops"}\n')
    with pytest.raises(ArfuseError, match=r"l.jsonl:2: each line needs a \"text\""):
        read_lambada(p)


def test_acc_and_acc_norm_follow_lm_eval():
    class E:  # what mc_scores reads
        def __init__(self, texts, gold):
            self.options, self.texts, self.gold = texts, texts, gold
    # option 1 has the higher total log-likelihood, option 0 (longer) the higher per-character one
    ex = [E(["abcdefgh", "ab"], 0)]
    s = mc_scores(ex, np.array([-4.0, -3.0]))
    assert s.right(False).tolist() == [False] and s.right(True).tolist() == [True]
    np.testing.assert_allclose(s.probs(False)[0], [1 / (1 + math.e), math.e / (1 + math.e)])


def test_task_configs_load_and_errors(tmp_path):
    assert {"lambada", "arc_easy", "arc_challenge", "cbt_cn", "cbt_ne"} <= set(available())
    assert load_task("arc_easy").prompt == "Question: {question}\nAnswer:"
    with pytest.raises(ArfuseError, match="Did you mean 'arc_easy'"):
        load_task("arc_easyy")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "multiple_choice"\ndata = "x"\nformat = \n')
    with pytest.raises(ArfuseError, match=r"line 4"):
        load_task(str(bad))
    bad.write_text('name = "x"\nkind = "multiple_choice"\ndata = "x"\nformat = "arc"\npromt = "{question}"\n')
    with pytest.raises(ArfuseError, match="unknown key 'promt'.*Did you mean 'prompt'"):
        load_task(str(bad))


def test_cbt_task_end_to_end_on_tiny_models(tiny_models, tmp_path):
    from arfuse.cli.main import main

    p = tmp_path / "cbt.txt"
    queries = ["21 The XXXXX sat on the mat .\tcat\t\tcat|dog|mat", "21 A dog saw the XXXXX .\tmat\t\tcat|dog|mat",
               "21 The XXXXX ran .\tdog\t\tcat|dog|mat", "21 XXXXX is here .\tcat\t\tdog|cat"] * 2
    p.write_text("".join(_cbt_example(q) for q in queries))
    from arfuse.tasks.runner import TaskRunConfig, run_task

    rep = run_task(TaskRunConfig(task="cbt_cn", large=tiny_models["large"], small=tiny_models["small"], data=str(p),
                                 valid_split="0:4", n_boot=500), progress=False)
    assert rep["n_examples"] == 8 and rep["fused"]["acc"]["test"]["n"] == 4
    for m, key in zip(rep["alone"], ("large", "small")):
        assert 0 <= m["acc"] <= 1 and m["n"] == 8
    f = rep["fused"]["acc"]
    assert f["test"]["ci_low"] <= f["test"]["delta"] <= f["test"]["ci_high"]
    assert f["test"]["acc_fused"] == pytest.approx(f["test"]["acc_llm"] + f["test"]["delta"])
    # the CLI prints the same numbers
    assert main(["task", "cbt_cn", "--large", tiny_models["large"], "--data", str(p), "--quiet"]) == 0


def test_lambada_with_mismatched_tokenizers_is_a_clear_error(tiny_models, tmp_path):
    from arfuse.tasks.runner import TaskRunConfig, run_task

    p = tmp_path / "l.jsonl"
    p.write_text('{"text": "The quick brown fox jumps over the lazy dog"}\n' * 3)
    with pytest.raises(ArfuseError, match="vocabularies differ"):
        run_task(TaskRunConfig(task="lambada", large=tiny_models["large"], small=tiny_models["othervocab"],
                               data=str(p)), progress=False)


def test_lambada_fused_on_tiny_models_agrees_with_brute_force(tiny_models, tmp_path):
    """Greedy last-word accuracy of the fused model from the exact curve equals a direct
    token-by-token check on full distributions (the tiny vocabulary fits the top-k)."""
    import torch

    from arfuse.adapters import load_model
    from arfuse.scoring.scorer import ScoreConfig
    from arfuse.tasks.runner import TaskRunConfig, run_task

    lines = ["The quick brown fox jumps over the lazy dog", "A stitch in time saves nine",
             "In the beginning was the word", "The word was with God", "Café naïve résumé",
             "The lazy dog saves the word", "A quick fox was in time", "Nine dogs jump over the brown fox"]
    p = tmp_path / "l.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    V = big.info.vocab_size
    rep = run_task(TaskRunConfig(task="lambada", large=tiny_models["large"], small=tiny_models["small"], data=str(p),
                                 valid_split="none", score=ScoreConfig(topk=V), n_boot=200), progress=False)
    k = rep["fused"]["acc"]["k"]
    w = k / (1 + k)
    right = []
    for t in lines:
        ctx, tgt = t.rsplit(" ", 1)
        ids = big.encode(t).ids
        n_ctx = len(big.encode(ctx).ids)
        x = torch.tensor([ids[:-1]])
        pl, ps = big.logprobs(x)[0].exp(), small.logprobs(x)[0].exp()
        fused = w * pl + (1 - w) * ps
        right.append(all(int(fused[i - 1].argmax()) == ids[i] for i in range(n_ctx, len(ids))))
    assert rep["fused"]["acc"]["test"]["acc_fused"] == pytest.approx(np.mean(right))
    assert rep["fused"]["acc"]["test"]["undetermined"] == 0


def test_small_context_ablation_and_cached_blocks(tiny_models, tmp_path):
    """The small model reading only the last words of each context: its target tokens align
    with the large model's; a longer --limit reuses the cached request blocks."""
    from arfuse.tasks import loglik
    from arfuse.tasks.runner import TaskRunConfig, _last_words, run_task

    assert _last_words("one two three four", 2) == "three four"
    lines = ["The quick brown fox jumps over the lazy dog", "A stitch in time saves nine",
             "In the beginning was the word", "The word was with God", "The lazy dog saves the word",
             "A quick fox was in time", "Nine dogs jump over the brown fox", "The brown word was nine"]
    p = tmp_path / "l.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rep = run_task(TaskRunConfig(task="lambada", large=tiny_models["large"], small=tiny_models["large"], data=str(p),
                                 small_context_words=2, valid_split="0:4", n_boot=200), progress=False)
    assert rep["alone"][1]["name"].endswith("(last 2 words of context)")
    assert rep["alone"][0]["target_tokens"] == rep["alone"][1]["target_tokens"]
    f = rep["fused"]["acc"]["test"]
    assert f["acc_llm"] == pytest.approx(np.mean(rep["per_example"][0]["acc"][4:]))
    old = loglik.BLOCK
    try:
        loglik.BLOCK = 4
        cfg = dict(task="lambada", large=tiny_models["small"], data=str(p), valid_split="none")
        a = run_task(TaskRunConfig(limit=4, **cfg), progress=False)
        import arfuse.scoring.scorer as scorer

        calls = []
        real = scorer._score_windows
        scorer._score_windows = lambda *x, **k: calls.append(1) or real(*x, **k)
        try:
            b = run_task(TaskRunConfig(limit=8, **cfg), progress=False)
        finally:
            scorer._score_windows = real
        assert b["per_example"][0]["loglik"][:4] == a["per_example"][0]["loglik"]
        assert len(calls) > 0 and len(b["per_example"][0]["loglik"]) == 8
        n_first = len(calls)
        scorer._score_windows = lambda *x, **k: calls.append(1) or real(*x, **k)
        try:
            run_task(TaskRunConfig(limit=8, **cfg), progress=False)
        finally:
            scorer._score_windows = real
        assert len(calls) == n_first  # all from the cache now
    finally:
        loglik.BLOCK = old


def test_token_bound_covers_normalisers_that_lengthen_text():
    """The shortcut that skips tokenizing short task blocks must bound the tokens of NFKC-normalised text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from arfuse.adapters.hf import HFCausalLM

    vocab = {chr(i): i for i in range(32, 127)}
    vocab["[UNK]"] = len(vocab) + 32
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tk)

    m = HFCausalLM.__new__(HFCausalLM)  # only its tokenizer is needed here
    m.tokenizer = fast

    text = "\ufdfa" * 10  # one 3-byte character that NFKC expands to 18 characters
    n_tokens = len(fast(text, add_special_tokens=False)["input_ids"])
    assert n_tokens > len(text.encode())  # the raw bytes would not bound it
    assert m.token_bound(text) >= n_tokens
