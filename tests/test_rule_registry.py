"""The fusion-rule registry: a rule added in one file and one line works from `arfuse eval`,
`arfuse task` and `arfuse generate`; names, parameters and vocabularies fail with the fix."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from arfuse.adapters import load_model
from arfuse.cli.main import main
from arfuse.errors import ArfuseError
from arfuse.fusion.linear import logprob_average
from arfuse.fusion.registry import (RULES, Rule, available_rules, check_same_vocab, cross_tokenizer_hint, get_rule,
                                    golden_section, make_rule, register_rule, unregister_rule)
from toy_rule import ProductRule

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = ["--window", "48", "--stride", "16", "--bos", "never", "--topk", "8", "--quiet"]


@pytest.fixture
def product():
    register_rule(ProductRule)  # the one line that makes the toy rule a choice of every command
    yield ProductRule
    unregister_rule("product")
    assert "product" not in available_rules()


# ---- the toy rule from the three commands ---------------------------------------------------------------
def _product_logps(model_l, model_s, x: torch.Tensor, n: int, w: float) -> torch.Tensor:
    """The toy rule by hand: log of p_L^w p_S^(1 - w), renormalised, at the last n positions (float64)."""
    a = torch.log_softmax(model_l.forward_logits_tail(x, n)[0].double(), -1)
    b = torch.log_softmax(model_s.forward_logits_tail(x, n)[0].double(), -1)
    return torch.log_softmax(w * a + (1 - w) * b, -1)


def _direct_product_nll(tiny_models, data_spec: str, w: float) -> float:
    """Mean NLL of the product rule at w over the scorer's windows, from full distributions computed here."""
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import prepare_docs
    from arfuse.scoring.windows import plan_windows

    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    nll, n = 0.0, 0
    for doc in prepare_docs(big, load_dataset(data_spec), False):
        for win in plan_windows(len(doc.seq), window=48, stride=16, convention="sliding"):
            x = torch.as_tensor(doc.seq[win.ctx_start:win.tgt_end - 1])[None]
            t = torch.as_tensor(doc.seq[win.tgt_start:win.tgt_end]).long()
            nll -= _product_logps(big, small, x, win.n_targets, w).gather(1, t[:, None]).sum().item()
            n += win.n_targets
    return nll / n


def test_toy_rule_from_eval_matches_a_direct_computation(product, tiny_models, text_file, capsys):
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                 "--rule", "product", "--weight", "0.7", "--json", *OPTS]) == 0
    rep = json.loads(capsys.readouterr().out)
    row = next(r for r in rep["rows"] if r["kind"] == "rule")
    assert row["metrics"]["token_ppl"] == pytest.approx(math.exp(_direct_product_nll(tiny_models, text_file, 0.7)),
                                                        rel=1e-5)
    assert row["weights"] == pytest.approx([0.7, 0.3])
    assert rep["rule"]["name"] == "product" and rep["rule"]["source"] == "given (--weight)"
    ci = rep["rule"]["gain_ci"]
    assert ci["ci_low"] <= ci["gain_pct"] <= ci["ci_high"]


def test_toy_rule_weight_searched_on_valid_is_the_minimum(product, tiny_models, text_file, capsys):
    valid, data = text_file + "[:1500]", text_file + "[1500:]"
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", data,
                 "--valid", valid, "--rule", "product", "--json", *OPTS]) == 0
    rep = json.loads(capsys.readouterr().out)
    w = rep["rule"]["params"]["weights"][0]
    assert "golden-section" in rep["rule"]["source"] and "validation data" in rep["rule"]["source"]
    best = _direct_product_nll(tiny_models, valid, w)
    for v in (w - 0.02, w + 0.02, 0.0, 1.0):  # the validation NLL is convex in w: no neighbour does better
        if 0.0 <= v <= 1.0:
            assert best <= _direct_product_nll(tiny_models, valid, v) + 1e-9
    row = next(r for r in rep["rows"] if r["kind"] == "rule")
    assert row["metrics"]["token_ppl"] == pytest.approx(math.exp(_direct_product_nll(tiny_models, data, w)), rel=1e-5)


CONTEXT = [f"{i} The cat saw {i} dogs ." for i in range(1, 21)]
QUERIES = ["The XXXXX sat on the mat .", "A dog saw the XXXXX .", "The XXXXX ran .", "XXXXX is here .",
           "The word was XXXXX .", "XXXXX saw the cat .", "In the XXXXX was the word .", "The quick XXXXX jumps ."]
CANDIDATES = [["cat", "dog", "mat", "word"], ["fox", "time", "nine", "God"], ["mat", "word", "fox", "time"]]


def _cbt_file(path, gold=None):
    """CBT examples (each query with each candidate set); ``gold[i]``: the answer's index (default 0)."""
    items = [(q, c) for q in QUERIES for c in CANDIDATES]
    gold = gold if gold is not None else [0] * len(items)
    path.write_text("".join("\n".join(CONTEXT + [f"21 {q}\t{c[g]}\t\t{'|'.join(c)}"]) + "\n\n"
                            for (q, c), g in zip(items, gold)))
    return path


def _mc_scores(tiny_models, path):
    from arfuse.scoring.scorer import ScoreConfig
    from arfuse.tasks.loglik import score_continuations
    from arfuse.tasks.multiple_choice import mc_scores, read_cbt, requests

    ex = read_cbt(path)
    cfg = ScoreConfig(bos="auto", topk=32)  # what `arfuse task` scores with
    return [mc_scores(ex, score_continuations(load_model(tiny_models[m]), requests(ex), cfg, name="cbt_cn",
                                              progress=False).loglik()) for m in ("large", "small")]


def test_toy_rule_from_task_matches_the_rule_on_answer_distributions(product, tiny_models, tmp_path, capsys):
    p = _cbt_file(tmp_path / "cbt.txt")
    pl, ps = (s.predictions(False) for s in _mc_scores(tiny_models, p))
    # where the models disagree, the answer is alternately the small and the large model's pick:
    # fusing them matters, and the best w is inside (0, 1) or at an end depending on their margins
    flip = np.cumsum(pl != ps) % 2 == 1
    _cbt_file(p, np.where(pl == ps, pl, np.where(flip, ps, pl)).tolist())
    scores = _mc_scores(tiny_models, p)
    n_valid = 12
    assert main(["task", "cbt_cn", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", str(p),
                 "--rule", "product", "--valid-split", f"0:{n_valid}", "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rule"]["name"] == "product" and "grid of 1001 points" in rep["rule"]["source"]
    gold = scores[0].gold
    seen = set()
    for key, norm in (("acc", False), ("acc_norm", True)):
        # the toy rule on the answer distributions, by hand: argmax of w log p_L + (1 - w) log p_S
        with np.errstate(divide="ignore"):
            la, lb = (np.log(s.probs(norm)) for s in scores)

        def right(w, la=la, lb=lb):
            with np.errstate(invalid="ignore"):
                s = np.where(scores[0].valid, w * la + (1 - w) * lb, -np.inf)
            return s.argmax(1) == gold

        f = rep["fused"][key]
        grid = [right(w)[:n_valid].sum() for w in np.linspace(0, 1, 1001)]
        seen |= set(grid)
        assert f["valid"]["acc_fused"] == pytest.approx(max(grid) / n_valid)  # the best w of the validation part
        assert f["test"]["acc_fused"] == pytest.approx(right(f["w"])[n_valid:].mean())
        assert f["test"]["acc_llm"] == pytest.approx(scores[0].right(norm)[n_valid:].mean())
        assert f["test"]["ci_low"] <= f["test"]["delta"] <= f["test"]["ci_high"]
        assert f["test"]["delta"] == pytest.approx(f["test"]["acc_fused"] - f["test"]["acc_llm"])
    assert len(seen) > 1  # the weight changes answers: the check above is not vacuous
    # the table says which rule and how w was chosen
    assert main(["task", "cbt_cn", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", str(p),
                 "--rule", "product", "--weight", "0.6", "--valid-split", f"0:{n_valid}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rule: product, weights 0.6, 0.4 (LLM first); chosen: given (--weight)" in out


def test_toy_rule_on_lambada_matches_full_distributions(product, tiny_models, tmp_path):
    from arfuse.tasks.runner import TaskRunConfig, run_task

    lines = ["The quick brown fox jumps over the lazy dog", "A stitch in time saves nine",
             "In the beginning was the word", "The word was with God", "Café naïve résumé",
             "The lazy dog saves the word"]
    p = tmp_path / "l.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rep = run_task(TaskRunConfig(task="lambada", large=tiny_models["large"], small=tiny_models["small"], data=str(p),
                                 valid_split="0:2", rule="product", weight=0.6, n_boot=200), progress=False)
    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    right, ll = [], []
    for t in lines[2:]:
        ctx = t.rsplit(" ", 1)[0]
        ids, n_ctx = big.encode(t).ids, len(big.encode(ctx).ids)
        fused = _product_logps(big, small, torch.tensor([ids[:-1]]), len(ids) - n_ctx, 0.6)
        tgt = torch.tensor(ids[n_ctx:])
        right.append(bool((fused.argmax(-1) == tgt).all()))
        ll.append(fused.gather(1, tgt[:, None]).sum().item())
    assert rep["fused"]["acc"]["test"]["acc_fused"] == pytest.approx(np.mean(right))
    assert rep["fused"]["perplexity"]["test"]["ppl_fused"] == pytest.approx(math.exp(-np.mean(ll)), rel=1e-5)
    assert rep["fused"]["acc"]["w"] == 0.6 and rep["rule"]["source"] == "given (--weight)"
    # without --weight: w is NLL-optimal on the validation passages' target tokens
    rep = run_task(TaskRunConfig(task="lambada", large=tiny_models["large"], small=tiny_models["small"], data=str(p),
                                 valid_split="0:2", rule="product", n_boot=200), progress=False)
    w = rep["fused"]["perplexity"]["w"]
    assert "golden-section" in rep["rule"]["source"] and rep["fused"]["acc"]["w"] == w

    def valid_nll(v):
        total = 0.0
        for t in lines[:2]:
            ids, n_ctx = big.encode(t).ids, len(big.encode(t.rsplit(" ", 1)[0]).ids)
            fused = _product_logps(big, small, torch.tensor([ids[:-1]]), len(ids) - n_ctx, v)
            total -= fused.gather(1, torch.tensor(ids[n_ctx:])[:, None]).sum().item()
        return total

    assert all(valid_nll(w) <= valid_nll(v) + 1e-9 for v in (w - 0.01, w + 0.01, 0.0, 1.0) if 0 <= v <= 1)


def test_toy_rule_from_generate_is_the_argmax_step_by_step(product, tiny_models, capsys):
    prompt = "In the beginning was"
    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--rule", "product",
                 "--weight", "0.6", "--max-new-tokens", "10", "--json", prompt]) == 0
    got = json.loads(capsys.readouterr().out)[0]["token_ids"]
    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    ids = big.encode(prompt).ids
    for t in got:  # each token is the argmax of the toy rule on a full recompute
        fused = _product_logps(big, small, torch.tensor([ids]), 1, 0.6)[0]
        assert int(fused.argmax()) == t
        ids.append(t)
    assert len(got) == 10
    # and it is the toy rule that ran: the mixture at the same weight says something else
    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--weight", "0.6",
                 "--max-new-tokens", "10", "--json", prompt]) == 0
    assert json.loads(capsys.readouterr().out)[0]["token_ids"] != got


# ---- names, parameters, vocabularies ----------------------------------------------------------------------
def test_unknown_rule_names_the_choices(product, tiny_models, capsys):
    with pytest.raises(ArfuseError, match=r"unknown fusion rule 'prodct': use one of linear, cosine, union, product\. "
                                          r"Did you mean 'product'"):
        get_rule("prodct")
    base = ["--large", tiny_models["large"], "--small", tiny_models["small"]]
    assert main(["generate", *base, "--rule", "cosin", "--power", "1", "x"]) == 2
    assert "Did you mean 'cosine'" in capsys.readouterr().err
    assert main(["task", "cbt_cn", *base, "--rule", "liner", "--quiet"]) == 2
    assert "Did you mean 'linear'" in capsys.readouterr().err


@pytest.mark.parametrize("params, message", [
    ({"power": -1}, "cosine rule: power = -1 is outside [0, inf]"),
    ({"power": "strong"}, "cosine rule: power 'strong' is not a number"),
    ({"power": 1, "embeddings": "medium"}, "cosine rule: embeddings 'medium': use one of large, small"),
    ({"powr": 1}, "the cosine rule has no parameter powr (its parameters: power, embeddings)"),
])
def test_bad_parameters_name_the_value(params, message):
    with pytest.raises(ArfuseError, match=re.escape(message)):
        make_rule("cosine", **params)


def test_bad_parameters_from_the_command_line(tiny_models, capsys):
    base = ["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--rule", "cosine"]
    assert main(base + ["--param", "power=-2", "x"]) == 2
    assert "power = -2.0 is outside [0, inf]" in capsys.readouterr().err
    assert main(base + ["--param", "alpha=1", "--power", "1", "x"]) == 2
    assert "alpha is not a parameter of the cosine rule (its parameters: embeddings, power)" in capsys.readouterr().err
    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--weight", "1.5",
                 "x"]) == 2
    assert "weight 1.5 is outside [0, 1]" in capsys.readouterr().err


def _options_named(message: str) -> list[str]:
    return re.findall(r"--rule (\w+)", message)


def test_different_vocabularies_name_options_that_exist(tiny_models, capsys):
    big, other = load_model(tiny_models["large"]), load_model(tiny_models["othervocab"])
    for rule in (make_rule("linear", [0.5, 0.5]), make_rule("cosine", power=1.0)):
        with pytest.raises(ArfuseError) as e:
            rule.bind([big, other])
        msg = str(e.value)
        assert "vocabularies differ" in msg and f"the {rule.name} rule needs one tokenizer" in msg
        assert _options_named(msg) == ["union"] and all(n in RULES for n in _options_named(msg))
    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["othervocab"], "--weight", "0.5",
                 "x"]) == 2
    err = capsys.readouterr().err
    assert "vocabularies differ" in err and "--rule union" in err


def test_cross_tokenizer_hint_follows_the_registry(tiny_models):
    class AnyVocab(Rule):
        name, paper, summary, same_vocab = "anyvocab", "a test", "aligns vocabularies (a test)", False

        def __call__(self, logps):
            return logps[0]

    assert _options_named(cross_tokenizer_hint()) == ["union"]
    register_rule(AnyVocab)
    try:
        hint = cross_tokenizer_hint()
        assert _options_named(hint) == ["union", "anyvocab"]
        big, other = load_model(tiny_models["large"]), load_model(tiny_models["othervocab"])
        with pytest.raises(ArfuseError, match="--rule anyvocab"):
            check_same_vocab([big, other], "linear")
    finally:
        unregister_rule("anyvocab")
    assert "anyvocab" not in RULES
    unregister_rule("cosine")  # built-in rules stay
    assert "cosine" in RULES


def test_rule_over_tokens_is_refused_for_answers(tiny_models, tmp_path, capsys):
    p = _cbt_file(tmp_path / "cbt.txt")
    assert main(["task", "cbt_cn", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", str(p),
                 "--rule", "cosine", "--power", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the cosine rule reads the tokens themselves" in err and "use one of linear" in err


def test_rule_counts_replace_and_fit():
    with pytest.raises(ArfuseError, match="the cosine rule fuses one large and one small model, 3 given"):
        make_rule("cosine", power=1.0).check_models(3)
    with pytest.raises(ArfuseError, match="3 weights given for 2 models"):
        make_rule("linear", [0.2, 0.3, 0.5]).check_models(2)
    r = ProductRule().replace(weights=[0.25, 0.75])
    assert r.weights == [0.25, 0.75] and r.missing() == [] and r.label() == "product rule (w = 0.25)"
    with pytest.raises(ArfuseError, match="no parameter power"):
        r.replace(power=1)
    # the generic search: the NLL of targets drawn from the rule at w = 0.3 is smallest near 0.3
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(4000, 9, generator=g) * 2, -1)
    b = torch.log_softmax(torch.randn(4000, 9, generator=g) * 2, -1)
    t = torch.multinomial(logprob_average([a, b], [0.3, 0.7]).exp(), 1, generator=g)[:, 0]
    fit = ProductRule().fit([a, b], t)
    w = fit.rule.weights[0]
    grid = np.linspace(0, 1, 201)
    nll = [-logprob_average([a, b], [v, 1 - v]).gather(1, t[:, None]).double().sum().item() for v in grid]
    assert abs(w - grid[int(np.argmin(nll))]) <= 0.005 and abs(w - 0.3) < 0.1 and not fit.exact
    assert golden_section(lambda x: (x - 0.123) ** 2, 0.0, 1.0) == pytest.approx(0.123, abs=1e-6)
    assert make_rule("cosine").missing() == ["power"] and make_rule("linear").missing() == ["weights"]
    with pytest.raises(ArfuseError, match=re.escape("the cosine rule needs power: give --power")):
        Rule.check_fit(make_rule("cosine"), 2)  # the generic search finds weights only


def test_a_rule_declared_by_an_installed_package_is_a_choice_of_the_cli(tiny_models, monkeypatch, capsys):
    """An entry point in the group arfuse.rules (one line of a package's pyproject.toml) registers a rule
    for every command, the console script included."""
    from importlib.metadata import EntryPoint

    import arfuse.fusion.registry as reg

    eps = [EntryPoint("product", "toy_rule:ProductRule", reg.PLUGIN_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: eps if group == reg.PLUGIN_GROUP else [])
    monkeypatch.setattr(reg, "_plugins_read", False)
    monkeypatch.setattr(reg, "RULES", dict(reg.RULES))
    monkeypatch.setattr(reg, "_LOADED", dict(reg._LOADED))
    assert reg.available_rules() == ["linear", "cosine", "union", "product"]
    assert main(["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], "--rule", "product",
                 "--weight", "0.6", "--max-new-tokens", "4", "--json", "In the beginning"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["token_ids"]) == 4
    assert reg.get_rule("product").__name__ == "ProductRule"
