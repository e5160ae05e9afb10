"""EvalConfig's checks, the head registry and the one EvalReport, without models."""
import math
import sys
import types

import pytest

from arfuse.errors import ArfuseError
from arfuse.tasks.config import EvalConfig
from arfuse.adapters.registry import BACKENDS, Backend, register_backend
from arfuse.tasks.heads import HEADS, evaluate, head_for
from arfuse.tasks.report import EvalReport, Row, weight_cells


@pytest.mark.parametrize("kw, match", [
    ({"smalls": []}, "no small model given"),
    ({"weights": [0.5, 0.6]}, "sum to 1"),
    ({"weights": [1.2, -0.2]}, r"weight 1.2 is outside \[0, 1\]"),
    ({"weights": [0.5, 0.3, 0.2]}, "3 weights given for 2 models"),
    ({"rule": "cosin"}, "unknown fusion rule 'cosin'.*Did you mean 'cosine'"),
    ({"rule_params": {"power": 1.0}}, "the linear rule has no parameter power"),
    ({"rule": "cosine", "rule_params": {"power": -1.0}}, "power = -1.0 is outside"),
    ({"rule": "cosine", "smalls": ["b", "c"]}, r"the cosine rule fuses .*, 3 given"),
    ({"objective": "f1"}, "objective 'f1': use one of nll, accuracy"),
    ({"objective": "nll", "weights": [0.9, 0.1]}, "objective 'nll' and given weights contradict"),
    ({"objective": "accuracy", "smalls": ["b", "c"]}, "exact accuracy search is for two models, but 3 were given"),
    ({"dtype": "float64"}, "dtype 'float64': use one of float32"),
    ({"batch_size": 0}, "batch_size 0 must be an integer >= 1"),
])
def test_bad_configs_fail_when_built_with_the_fix(kw, match):
    with pytest.raises(ArfuseError, match=match):
        EvalConfig(**{"large": "a", "smalls": ["b"], "data": "d", **kw})


def test_a_config_normalises_what_it_is_given():
    cfg = EvalConfig("a", "b", "d", weights=(0.25, 0.75), rule="cosine", rule_params={"power": 2})
    assert cfg.smalls == ["b"] and cfg.weights == [0.25, 0.75] and cfg.rule_params == {"power": 2}
    with pytest.raises(AttributeError):
        cfg.weights = [0.5, 0.5]  # validated once: frozen
    d = cfg.to_dict()
    assert d["score"]["window"] == 1024 and d["mask"]["rate"] == 0.15 and d["rule"] == "cosine"


def test_the_head_comes_from_the_backend_registry_and_mixed_kinds_are_refused(tmp_path):
    llama2c = tmp_path / "m.bin"
    llama2c.write_bytes(b"")
    assert set(HEADS) == {"causal", "image", "masked"}
    assert head_for([str(llama2c)]) == "causal"
    assert head_for(["torchvision:resnet18", "timm:resnet18"]) == "image"
    assert head_for(["facebook/esm2_t6_8M_UR50D"]) == "masked"
    with pytest.raises(ArfuseError, match=r"different kinds \(.*m.bin is a causal model, torchvision:resnet18 is an "
                                          r"image model\)"):
        head_for([str(llama2c), "torchvision:resnet18"])


def _report(**kw) -> EvalReport:
    rows = [Row("big", "large", {"x": 1.0}, 0.0), Row("AR fused", "fused", {"x": 2.0}, 12.5, [1.0, 0.0])]
    base = dict(head="fake", models=[{"name": "big", "num_parameters": 10}, {"name": "small", "num_parameters": 1}],
                data={"name": "d"}, valid=None, windowing="w", weights=[1.0, 0.0], k=math.inf, weight_source="given",
                search="given", param_ratio=[10.0], rows=rows, gain_of="fake perplexity")
    return EvalReport(**{**base, **kw})


def test_a_new_head_is_one_module_and_one_line(tmp_path, monkeypatch):
    """evaluate() dispatches through HEADS; the report's text comes from the head's describe()."""
    fake = types.ModuleType("fake_head")
    fake.KIND = "fake models"
    fake.evaluate = lambda cfg, *, progress=True: _report(data={"name": cfg.data})
    fake.describe = lambda report: f"fake report on {report.data['name']}"
    monkeypatch.setitem(sys.modules, "fake_head", fake)
    monkeypatch.setitem(HEADS, "fake", "fake_head")  # the one line
    # a backend whose models have that head (adapters.registry: one line too)
    register_backend(Backend("fake", "fake", lambda spec: spec.endswith(".fake"), lambda spec, **kw: None))
    try:
        rep = evaluate(EvalConfig("a.fake", ["b.fake"], "some data"), progress=False)
        assert rep.to_markdown() == "fake report on some data"
        with pytest.raises(ArfuseError, match=r"different kinds \(a.fake is a fake model, stories260k is a causal"):
            evaluate(EvalConfig("a.fake", ["stories260k"], "some data"), progress=False)
    finally:
        BACKENDS[:] = [b for b in BACKENDS if b.name != "fake"]


def test_one_report_type_json_and_plot(tmp_path):
    rep = _report()
    d = rep.to_dict()
    assert d["k"] == "inf" and d["rows"][1]["gain_pct"] == 12.5 and d["rule"] is None and d["curve"] is None
    assert rep.fused.gain == 12.5
    with pytest.raises(ArfuseError, match="no gain curve to plot: the improvement domain is empty"):
        rep.plot(str(tmp_path / "x.png"))
    rep.curve = {"k": [0.1, 1.0, 10.0], "gain_pct": [1.0, 3.0, 2.0]}
    rep.k, rep.k_star, rep.domain_k = 1.0, 1.0, (0.05, math.inf)
    png = tmp_path / "g.png"
    assert rep.plot(str(png)) == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    step = _report(curve={"edges": [0.0, 0.5, 2.0, math.inf], "gain_pp": [-1.0, 2.0, 0.0]}, k=1.0,
                   rows=[Row("big", "large", {}, None, gain_pp=0.0), Row("AR fused", "fused", {}, None, [0.5, 0.5],
                                                                         gain_pp=2.0)])
    assert step.plot(str(tmp_path / "s.png")).endswith("s.png")


def test_weight_cells():
    assert weight_cells(None) == ["", ""]
    assert weight_cells([0.75, 0.25]) == ["0.750000", "3"]
    assert weight_cells([1.0, 0.0]) == ["1.000000", "inf"]
    assert weight_cells([0.5, 0.25, 0.25]) == ["0.500000", ""]
    assert weight_cells([0.5, 0.25, 0.25], k_for_any=True) == ["0.500000", "1"]
