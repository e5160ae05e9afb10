"""`arfuse eval` end to end on tiny in-process models, and on the real stories260K."""
import json
import math

import numpy as np
import pytest

from arfuse.adapters import load_model
from arfuse.cli.main import main
from arfuse.fusion import linear
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.data.text import load_dataset
from arfuse.tasks.metrics import perplexity_metrics
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.heads import evaluate

OPTS = ["--window", "48", "--stride", "16", "--bos", "never", "--topk", "8", "--quiet"]
CFG = ScoreConfig(window=48, stride=16, bos="never", topk=8)


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, *OPTS, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_table_names_models_weights_and_source(tiny_models, text_file, capsys):
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file, *OPTS]) == 0
    out = capsys.readouterr().out
    for needle in ("AR fused", "uniform average", "token PPL", "gain %", "parameter ratio r",
                   "NLL-optimal on the test data itself", "sliding window 48"):
        assert needle in out, needle


def test_searched_weight_is_exact_and_beats_every_grid_point(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file)
    w = rep["weights"][0]
    # the fused PPL in the report equals a direct numpy computation on the cached arrays
    data = load_dataset(text_file)
    a = score(load_model(tiny_models["large"]), data, CFG, progress=False).logp.astype(np.float64)
    b = score(load_model(tiny_models["small"]), data, CFG, progress=False).logp.astype(np.float64)
    fused = [r for r in rep["rows"] if r["kind"] == "fused"][0]
    direct = math.exp(-np.mean(np.log(w * np.exp(a) + (1 - w) * np.exp(b))))
    assert fused["metrics"]["token_ppl"] == pytest.approx(direct, rel=1e-9)
    grid = np.linspace(0, 1, 1001)
    nll = [-np.mean(np.log(g * np.exp(a) + (1 - g) * np.exp(b))) for g in grid]
    best = -np.mean(np.log(w * np.exp(a) + (1 - w) * np.exp(b)))
    assert best <= min(nll) + 1e-12
    # within 1e-6 of the optimum: the derivative changes sign across w +- 1e-6
    d = lambda x: np.mean((np.exp(a) - np.exp(b)) / (x * np.exp(a) + (1 - x) * np.exp(b)))  # noqa: E731
    if 0 < w < 1:
        assert d(w - 1e-6) > 0 > d(w + 1e-6) or abs(d(w)) < 1e-9
    assert rep["weight_source"].startswith("NLL-optimal on the test data itself")
    assert rep["k"] == pytest.approx(w / (1 - w))


def test_weight_one_reproduces_the_large_model_bit_for_bit(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                     "--weight", "1")
    rows = {r["kind"]: r for r in rep["rows"]}
    assert rows["fused"]["metrics"] == rows["large"]["metrics"]
    assert rows["fused"]["gain_pct"] == 0.0
    data = load_dataset(text_file)
    a = score(load_model(tiny_models["large"]), data, CFG, progress=False)
    b = score(load_model(tiny_models["small"]), data, CFG, progress=False)
    before = (a.logp.copy(), b.logp.copy())
    fused = linear([a.logp, b.logp], [1.0, 0.0])
    assert np.array_equal(fused, a.logp)
    assert np.array_equal(a.logp, before[0]) and np.array_equal(b.logp, before[1])  # inputs untouched


def test_valid_split_picks_the_weight_and_the_report_says_so(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"],
                     "--data", text_file + "[1500:]", "--valid", text_file + "[:1500]")
    assert "validation data" in rep["weight_source"] and "[:1500]" in rep["weight_source"]
    assert rep["valid"]["chars"] == 1500 and rep["data"]["chars"] == 1500


def test_three_models_on_the_simplex(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"],
                     "--small", tiny_models["small2"], "--data", text_file)
    assert len(rep["weights"]) == 3 and sum(rep["weights"]) == pytest.approx(1.0)
    fused = [r for r in rep["rows"] if r["kind"] == "fused"][0]
    assert fused["gain_pct"] >= 0.0   # the LLM alone is a point of the simplex


def test_plot_is_written(tiny_models, text_file, tmp_path, capsys):
    png = tmp_path / "gain.png"
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                 *OPTS, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("argv, needle", [
    (["--weight", "1.5"], "outside [0, 1]"),
    (["--weight", "-0.1"], "outside [0, 1]"),
    (["--weights", "0.5,0.6"], "sum to 1"),
])
def test_bad_weights_are_clear_errors(tiny_models, text_file, capsys, argv, needle):
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                 *OPTS, *argv]) == 2
    assert needle in capsys.readouterr().err


def test_different_vocabularies_fuse_by_segments_and_a_token_rule_names_the_union_rule(tiny_models, text_file,
                                                                                        capsys):
    args = ["eval", "--large", tiny_models["large"], "--small", tiny_models["othervocab"], "--data", text_file, *OPTS]
    assert main(args) == 0
    assert "segment mixture across tokenizers" in capsys.readouterr().out
    assert main([*args, "--rule", "cosine"]) == 2
    err = capsys.readouterr().err
    assert "needs one tokenizer" in err and "--rule union" in err


def test_eval_rule_union_adds_its_teacher_forced_row(tiny_models, text_file, tmp_path):
    from arfuse.tasks.config import EvalConfig as Cfg

    cfg = Cfg(large=tiny_models["large"], smalls=[tiny_models["othervocab"]], data=text_file, score=CFG,
              rule="union", rule_params={"topk": 4})
    rep = evaluate(cfg, progress=False)
    row = next(r for r in rep.rows if r.kind == "rule")
    u = rep.data["union_rule"]
    assert u["k"] == 4 and 0.0 <= u["w"] <= 1.0 and 0.0 < u["coverage"] <= 1.0
    assert np.isfinite(row.metrics["bits_per_byte"]) and row.metrics["bits_per_byte"] > 0
    # fitted on the data itself (no --valid): w is the exact optimum of the linear rule over the LLM's
    # probability and the SLM's union probability carried onto the LLM's tokens, checked against the
    # scores computed again; w = 1 is the LLM alone, so the optimum cannot lose to it
    from arfuse.search.weights import optimal_weight
    from arfuse.tasks.union_eval import mix_logp, score_union

    big, other = load_model(tiny_models["large"]), load_model(tiny_models["othervocab"])
    s = score_union(big, other, load_dataset(text_file), ks=(4,), window=48, bos="never", progress=False)
    assert u["coverage"] == pytest.approx(np.isfinite(s.lq_small[4]).mean())
    assert u["w"] == pytest.approx(optimal_weight(s.lp_large, s.lq_small[4]).w, abs=1e-9)
    lp = mix_logp(s, 4, u["w"])
    assert row.metrics["nll"] == pytest.approx(-lp.mean())
    assert np.allclose(mix_logp(s, 4, 1.0), s.lp_large) and row.gain_pct >= -1e-9
    assert np.all(s.lq_small[4] <= 1e-12)   # probabilities, at most 1
    assert "union rule" in rep.to_markdown()


def test_empty_file_and_missing_model_are_clear_errors(tiny_models, tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", str(empty), *OPTS]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["eval", "--large", str(tmp_path / "nope"), "--small", tiny_models["small"], "--data", text_file, *OPTS]) == 2
    err = capsys.readouterr().err
    assert "nope" in err


def test_eval_twice_uses_the_cache(tiny_models, text_file, monkeypatch):
    from arfuse.scoring import scorer as scorer_mod

    cfg = EvalConfig(large=tiny_models["large"], smalls=[tiny_models["small"]], data=text_file, score=CFG)
    first = evaluate(cfg, progress=False)
    calls = []
    monkeypatch.setattr(scorer_mod, "_score_windows", lambda *a, **k: calls.append(1))
    second = evaluate(EvalConfig(**{**cfg.__dict__, "weights": [0.7, 0.3]}), progress=False)
    assert calls == []   # nothing rescored
    assert second.rows[0].metrics == first.rows[0].metrics


# ---- real models -------------------------------------------------------------------------

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Lily was "
         "very happy. She played with the ball all day long. When the sun went down, she went home to her mom.\n")


@pytest.mark.slow
def test_stories260k_end_to_end(shared_data, tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text(STORY * 3)
    assert main(["score", "stories260k", str(story), "--window", "64", "--stride", "32", "--bos", "always",
                 "--quiet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    m = load_model("stories260k")
    assert m.num_parameters == 260_032
    rec = score(m, load_dataset(str(story)), ScoreConfig(window=64, stride=32, bos="always"), progress=False)
    direct = perplexity_metrics(rec.logp.astype(np.float64), rec.nbytes, rec.nchars, rec.nwords)
    assert rep["token_ppl"] == pytest.approx(direct["token_ppl"], rel=1e-12)
    # a 260K-parameter TinyStories model finds a simple story easy, and repetition easier still
    assert 1.5 < direct["token_ppl"] < 12.0
    # fusing the model with itself at any weight leaves every log-prob unchanged
    fused = linear([rec.logp, rec.logp], [0.3, 0.7])
    np.testing.assert_allclose(fused, rec.logp, atol=1e-6)


def test_independent_hf_guide_script_reproduces_arfuse_score(tiny_models, text_file, capsys):
    """benchmarks/check_hf_guide_ppl.py (transformers only) gives the same token perplexity."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_hf_guide_ppl.py"
    out = subprocess.run([sys.executable, str(script), tiny_models["large"], text_file, "3000", "48", "16"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert main(["score", tiny_models["large"], text_file, "--window", "48", "--stride", "16", "--bos", "never",
                 "--quiet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert int(out[1]) == rep["tokens"]
    assert float(out[3]) == pytest.approx(rep["token_ppl"], rel=1e-5)


def test_near_miss_model_name_suggests_the_alias(text_file, capsys):
    assert main(["score", "smolm2-135m", text_file, "--quiet"]) == 2
    assert "Did you mean 'smollm2-135m'" in capsys.readouterr().err


# ---- the cosine rule in scoring (`--rule cosine`) ------------------------------------------------
def _direct_cosine_nll(tiny_models, text_file, p: float) -> float:
    """Mean NLL of the cosine rule at power p, from full distributions computed here, window by window,
    with a full V x V similarity matrix (what the library never builds)."""
    import torch

    from arfuse.scoring.scorer import prepare_docs
    from arfuse.scoring.windows import plan_windows

    llm, slm = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    emb = llm.input_embeddings().float()
    e = emb / emb.norm(dim=-1, keepdim=True)
    S = ((1 + e @ e.T) / 2).double()  # (V, V)
    data = load_dataset(text_file)
    nll, n = 0.0, 0
    for doc in prepare_docs(llm, data, False):
        for w in plan_windows(len(doc.seq), window=48, stride=16, convention="sliding"):
            x = torch.as_tensor(doc.seq[w.ctx_start:w.tgt_end - 1])[None]
            ll = torch.log_softmax(llm.forward_logits_tail(x, w.n_targets)[0].double(), -1)
            a = slm.forward_logits_tail(x, w.n_targets)[0].argmax(-1)
            q = ll.exp() * S[a] ** p
            q = q / q.sum(-1, keepdim=True)
            t = torch.as_tensor(doc.seq[w.tgt_start:w.tgt_end]).long()
            nll -= q.gather(1, t[:, None]).log().sum().item()
            n += w.n_targets
    return nll / n


def test_cosine_rule_in_eval_matches_a_direct_computation(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                     "--rule", "cosine", "--power", "2.5")
    rows = {r["kind"]: r for r in rep["rows"]}
    assert set(rows) == {"large", "small", "uniform", "fused", "rule"}
    direct = math.exp(_direct_cosine_nll(tiny_models, text_file, 2.5))
    assert rows["rule"]["metrics"]["token_ppl"] == pytest.approx(direct, rel=1e-5)
    rule = rep["rule"]
    assert rule["name"] == "cosine" and rule["params"]["power"] == 2.5 and rule["source"] == "given (--power)"
    assert rule["gain_ci"]["ci_low"] <= rule["gain_ci"]["gain_pct"] <= rule["gain_ci"]["ci_high"]


def test_cosine_power_searched_is_the_minimum(tiny_models, text_file, capsys):
    rep = _eval_json(capsys, "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                     "--rule", "cosine")
    p = rep["rule"]["params"]["power"]
    assert "NLL-optimal on the test data itself" in rep["rule"]["source"]
    best = _direct_cosine_nll(tiny_models, text_file, p)
    for q in (p * 0.8, p * 1.25, p + 0.05, max(p - 0.05, 0.0), 0.0):
        assert best <= _direct_cosine_nll(tiny_models, text_file, q) + 1e-9


def test_cosine_options_need_the_cosine_rule(tiny_models, text_file, capsys):
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", text_file,
                 "--power", "1", *OPTS]) == 2
    assert "--power is not a parameter of the linear rule" in capsys.readouterr().err
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--small",
                 tiny_models["small"], "--data", text_file, "--rule", "cosine", "--power", "1", *OPTS]) == 2
    err = capsys.readouterr().err
    assert "the cosine rule fuses" in err and "3 given" in err
