"""The lm-evaluation-harness model `arfuse`: lm-eval's own `hf` numbers at weight 1, fused numbers at
other weights, and `arfuse lm-eval` end to end (tiny in-process models, the shared data's files)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_extra

lm_eval = require_extra("lm_eval", "lm-eval")

from arfuse.errors import ArfuseError  # noqa: E402
from arfuse.serve.harness import lm_class, task_dir  # noqa: E402

GEN_TASK = """task: tiny_gen
custom_dataset: !function tiny_gen_data.load
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_DATA = '''import datasets


def load(**_):
    rows = {"prompt": ["The quick brown fox", "In the beginning was", "A stitch in time"],
            "target": ["jumps", "the word", "saves nine"]}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})
'''


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shared_data):
    """A task manager over arfuse's local tasks and a tiny generation task."""
    from lm_eval.tasks import TaskManager

    gen = tmp_path_factory.mktemp("gen_task")
    (gen / "tiny_gen.yaml").write_text(GEN_TASK)
    (gen / "tiny_gen_data.py").write_text(GEN_DATA)
    wiki = f"{shared_data / 'text/wikitext-2/wiki.test.raw'}[:2500]"
    return TaskManager(include_path=[str(task_dir()), str(gen)], include_defaults=False,
                       metadata={"wikitext_data": wiki, "wikitext_documents": "one"})


TASKS = {"arfuse_lambada_openai": 4, "arfuse_wikitext": 1, "tiny_gen": 3}


def _run(model, tasks) -> dict:
    """Per task: lm-eval's metrics and each example's filtered responses."""
    out = {}
    for name, limit in TASKS.items():
        res = lm_eval.simple_evaluate(model=model, tasks=[name], task_manager=tasks, limit=limit, log_samples=True,
                                      bootstrap_iters=0)
        resps = [s["filtered_resps"] for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])]
        out[name] = ({k: v for k, v in res["results"][name].items() if k != "alias"}, resps)
    return out


@pytest.fixture(scope="module")
def runs(tiny_models, tasks, one_thread):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny_models["large"], batch_size=1, device="cpu")
    ArfuseLM = lm_class()
    one = ArfuseLM(large=tiny_models["large"], small=tiny_models["small"], weight=1.0)
    fused = ArfuseLM(large=tiny_models["large"], small=tiny_models["small"], weight=0.7)
    return {"hf": _run(hf, tasks), "w1": _run(one, tasks), "w07": _run(fused, tasks), "fused_lm": fused}


@pytest.mark.parametrize("task", list(TASKS))
def test_weight_one_is_lm_evals_hf_model_exactly(runs, task):
    """loglikelihood (LAMBADA), loglikelihood_rolling (WikiText) and greedy generate_until: the same
    numbers and texts as lm-eval's own hf model on the same weights, to the last bit."""
    hf_metrics, hf_resps = runs["hf"][task]
    metrics, resps = runs["w1"][task]
    assert resps == hf_resps
    assert metrics == hf_metrics
    if task == "arfuse_wikitext":
        assert math.isfinite(metrics["bits_per_byte,none"]) and metrics["bits_per_byte,none"] > 0
    if task == "tiny_gen":
        assert all(r[0] for r in resps)  # the random tiny model still writes something


def test_fused_weight_differs_and_is_the_mixture(runs, tiny_models):
    """At w = 0.7 every request type runs and gives other numbers; a continuation's log-likelihood is
    log(0.7 p_L + 0.3 p_S) summed over its tokens, computed here from the raw transformers models."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for task in TASKS:
        assert runs["w07"][task][1] != runs["w1"][task][1], task
    lam = runs["w07"]["arfuse_lambada_openai"][1]
    assert all(math.isfinite(r[0][0]) for r in lam)
    # an independent computation of one loglikelihood request
    ctx, cont = "In the beginning was the word, and the", " word was with God"
    tok = AutoTokenizer.from_pretrained(tiny_models["large"])
    whole, n_ctx = tok(ctx + cont)["input_ids"], len(tok(ctx)["input_ids"])
    x = torch.tensor([whole[:-1]])
    with torch.no_grad():
        lps = [torch.log_softmax(AutoModelForCausalLM.from_pretrained(tiny_models[k])(x).logits[0].double(), -1)
               for k in ("large", "small")]
    tgt = torch.tensor(whole[n_ctx:])
    pos = torch.arange(n_ctx - 1, len(whole) - 1)
    want = float(torch.logaddexp(lps[0][pos, tgt] + math.log(0.7), lps[1][pos, tgt] + math.log(0.3)).sum())
    got, _ = runs["fused_lm"].loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0]
    assert got == pytest.approx(want, rel=1e-5)


def test_other_rules_answer_every_request(tiny_models):
    """A rule other than the linear one (cosine, with its power) fuses every request type."""
    from lm_eval.api.instance import Instance

    lm = lm_class().create_from_arg_string(f"large={tiny_models['large']},small={tiny_models['small']},"
                                           "rule=cosine,power=1.0", {"batch_size": 2, "device": None})
    one = lm_class()(large=tiny_models["large"])
    ll = [Instance("loglikelihood", {}, ("A stitch in", " time saves nine"), 0)]
    roll = [Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog. " * 12,), 0)]
    gen = [Instance("generate_until", {}, ("The quick", {"until": ["."], "max_gen_toks": 6}), 0)]
    a, b = lm.loglikelihood(ll)[0][0], one.loglikelihood(ll)[0][0]
    assert math.isfinite(a) and a != b
    a, b = lm.loglikelihood_rolling(roll)[0], one.loglikelihood_rolling(roll)[0]
    assert math.isfinite(a) and a != b
    assert isinstance(lm.generate_until(gen)[0], str)


@pytest.mark.parametrize("args,match", [
    (dict(), "needs large=MODEL"),
    (dict(large="L", small="S", weight=1.5), "outside"),
    (dict(large="L", small="S", weight=0.5, colour="red"), "colour"),
    (dict(large="L", small="S", weight=0.5, rule="avg"), "unknown fusion rule 'avg'"),
    (dict(large="L", small="S", weight=0.5, max_length=100000), "max_length=100000 exceeds"),
    (dict(large="L", batch_size="many"), "batch_size='many'"),
])
def test_bad_model_args_fail_with_the_fix(tiny_models, args, match):
    args = {k: tiny_models["large"] if v == "L" else tiny_models["small"] if v == "S" else v for k, v in args.items()}
    with pytest.raises(ArfuseError, match=match):
        lm_class()(**args)
    # the way lm-eval's command line builds it: --model_args as a string, plus its batch size and device
    arg_string = ",".join(f"{k}={v}" for k, v in args.items())
    with pytest.raises(ArfuseError, match=match):
        lm_class().create_from_arg_string(arg_string, {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    from arfuse.serve import harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ArfuseError, match=r"pip install -e '\.\[lm-eval\]'"):
        harness.require_lm_eval()


def test_arfuse_does_not_import_lm_eval():
    code = ("import sys, arfuse, arfuse.serve.harness, arfuse.cli.main; arfuse.cli.main.build_parser(); "
            "print('lm_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_include_path_is_added_for_arfuse_tasks():
    from arfuse.cli.lm_eval import lm_eval_argv

    assert lm_eval_argv(["--model", "arfuse", "--tasks", "arfuse_wikitext"])[-2:] == ["--include_path", str(task_dir())]
    assert "--include_path" not in lm_eval_argv(["--model", "hf", "--tasks", "hellaswag"])
    assert lm_eval_argv(["--tasks=x,arfuse_arc_easy", "--include_path", "mine"]).count("--include_path") == 1


def test_cli_runs_lm_eval_end_to_end(tiny_models, shared_data, tmp_path, runs):
    """`arfuse lm-eval` with lm-eval's own arguments on a local task: its perplexity and accuracy are
    those of the fused model's log-likelihoods of the same requests, computed in-process."""
    from lm_eval.api.instance import Instance

    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "arfuse"), "lm-eval", "--model", "arfuse", "--model_args",
           f"large={tiny_models['large']},small={tiny_models['small']},weight=0.7", "--tasks",
           "arfuse_lambada_openai", "--limit", "3", "--output_path", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, res.stderr[-3000:]
    metrics = json.loads(files[0].read_text())["results"]["arfuse_lambada_openai"]
    lines = (shared_data / "text/lambada/lambada_test.jsonl").read_text().splitlines()[:3]
    texts = [json.loads(line)["text"] for line in lines]
    reqs = [Instance("loglikelihood", {}, (" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]), 0) for t in texts]
    got = runs["fused_lm"].loglikelihood(reqs)
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(g[0] for g in got) / 3), rel=1e-9)
    assert metrics["acc,none"] == pytest.approx(sum(g[1] for g in got) / 3)


def test_registered_in_lm_evals_registry_as_arfuse():
    from lm_eval.api.registry import get_model

    from arfuse.serve import harness

    cls = harness.register()
    assert harness.register() is cls and get_model("arfuse") is cls
    assert harness.ArfuseLM is cls and cls.__module__ == "arfuse.serve.harness"
