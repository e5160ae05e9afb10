"""AR-law analysis over a family: pairs, fit, mainstay deviation, tables, plots, errors."""
import csv
import io
import json
import math

import numpy as np
import pytest

from arfuse.errors import ArfuseError
from arfuse.search.law import analyse_family, fit_law, mainstay_deviation


def test_fit_recovers_a_power_law_and_leaves_out_infinite_k():
    r = np.array([2.0, 4.0, 8.0, 16.0, 3.0])
    k = 2.0 * r ** 0.5
    k[-1] = math.inf
    f = fit_law(r, k)
    assert f["slope"] == pytest.approx(0.5) and f["intercept"] == pytest.approx(math.log10(2.0))
    assert f["r2"] == pytest.approx(1.0) and f["n_pairs"] == 4 and f["excluded"] == 1
    assert f["residuals"][-1] is None and max(abs(x) for x in f["residuals"][:4]) < 1e-12
    assert fit_law([2.0], [1.0])["slope"] is None


def test_mainstay_deviation_counts():
    t = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    pl = np.array([0, 1, 2, 2, 1, 1, 2, 2])   # LLM: predicts class 0 once, right once
    ps = np.array([0, 0, 0, 1, 0, 1, 0, 0])   # SLM: predicts class 0 six times, right four times
    m = mainstay_deviation(pl, ps, t, top=2)
    c0 = m["classes"][0]
    assert (c0["class"], c0["target_count"], c0["n_llm"], c0["n_slm"], c0["right_llm"], c0["right_slm"]) == (0, 5, 1, 6, 1, 4)
    assert c0["precision_llm"] == 1.0 and c0["precision_slm"] == pytest.approx(4 / 6)
    assert c0["slm_predicts_more"] and c0["slm_more_right"] and c0["assumption_holds"]
    c1 = m["classes"][1]
    assert (c1["n_llm"], c1["n_slm"], c1["right_llm"], c1["right_slm"]) == (3, 2, 2, 1)
    assert not c1["slm_predicts_more"] and m["theorem_checks"]


def test_law_cli_on_a_tiny_family(tiny_models, text_file, tmp_path):
    from arfuse.adapters import load_model
    from arfuse.cli.main import main
    from arfuse.scoring.scorer import ScoreConfig, score
    from arfuse.search import optimal_weight
    from arfuse.data.text import load_dataset

    fam = ",".join(tiny_models[k] for k in ("large", "small", "small2"))
    out = tmp_path / "law"
    assert main(["law", "--family", fam, "--data", text_file, "--window", "128", "--stride", "64", "--out", str(out),
                 "--quiet"]) == 0
    rep = json.loads((out / "law.json").read_text())
    assert len(rep["pairs"]) == 3
    big, small = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    pair = next(p for p in rep["pairs"] if p["slm"] == "small" and p["llm"] == "large")
    assert pair["r"] == pytest.approx(big.num_parameters / small.num_parameters)
    cfg = ScoreConfig(window=128, stride=64)
    data = load_dataset(text_file)
    a, b = score(big, data, cfg, progress=False), score(small, data, cfg, progress=False)
    opt = optimal_weight(a.logp, b.logp)
    assert pair["ppl"]["k_star"] == pytest.approx(opt.k, rel=1e-9)
    assert pair["acc"]["acc_llm"] == pytest.approx(np.mean(a.topk_ids[:, 0] == a.target))
    # every pair's k* has its residual from the fit; the residuals of a least-squares fit sum to 0
    res = [x for x in rep["fit"]["residuals"] if x is not None]
    assert len(res) == rep["fit"]["n_pairs"] and abs(sum(res)) < 1e-9
    rows = list(csv.DictReader(io.StringIO((out / "law.csv").read_text())))
    assert len(rows) == 3 and {r["slm"] for r in rows} >= {"small"}
    md = (out / "law.md").read_text()
    assert md.startswith("| LLM | SLM | r |") and "Law fit over" in md
    for name in ("law_gain.png", "law_heatmap.png", "law_fit.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_family_errors(tiny_models, text_file, capsys):
    from arfuse.cli.main import main

    assert main(["law", "--family", tiny_models["large"], "--data", text_file]) == 2
    assert "--family needs at least 2 models" in capsys.readouterr().err
    assert main(["law", "--family", f"{tiny_models['large']},{tiny_models['othervocab']}", "--data", text_file,
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "vocabularies differ" in err and "320" in err and "300" in err and "needs one tokenizer" in err
    with pytest.raises(ArfuseError, match="at least 2 models"):
        analyse_family([])
