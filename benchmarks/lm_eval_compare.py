"""Run lm-evaluation-harness itself on SmolLM2-135M, offline, on the same local files arfuse reads.

    .venv/bin/pip install -e '.[lm-eval]'     # once: lm-eval==0.4.13
    .venv/bin/python benchmarks/lm_eval_compare.py [--limit-lambada 200] [--limit-arc 200]

Tasks are lm-eval's own lambada_openai, arc_easy and arc_challenge definitions (same prompt:
LAMBADA context = the passage without its last word, target = " " + last word; ARC
"Question: {stem}\\nAnswer:" with each choice as " {text}"), pointed at ../shared/data
through the `json` loader instead of the hub. The model is the GGUF file's float32
dequantisation that arfuse caches (the same weights arfuse scores). Writes
benchmarks/results/lm_eval_smollm2.json: lm-eval's metrics and per-example results.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

LAMBADA = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

ARC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-lambada", type=int, default=100)
    ap.add_argument("--limit-arc-easy", type=int, default=100)
    ap.add_argument("--limit-arc-challenge", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_smollm2.json"))
    args = ap.parse_args()

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: .venv/bin/pip install -e '.[lm-eval]' "
                         "(lm-eval==0.4.13, the version these results were measured with)")

    from arfuse.adapters import load_model
    from arfuse.adapters.aliases import resolve_alias
    from arfuse.adapters.hf import gguf_converted_dir  # the float32 folder lm-eval loads
    from arfuse.paths import shared_data_root

    load_model("smollm2-135m")  # makes sure the float32 folder exists
    folder, digest = gguf_converted_dir(Path(resolve_alias("smollm2-135m")))
    data = shared_data_root()
    tmp = Path(tempfile.mkdtemp(prefix="arfuse_lmeval_"))
    specs = {"arfuse_lambada_openai": (LAMBADA, data / "text/lambada/lambada_test.jsonl", args.limit_lambada),
             "arfuse_arc_easy": (ARC, data / "mc/arc/ARC-Easy-Test.jsonl", args.limit_arc_easy),
             "arfuse_arc_challenge": (ARC, data / "mc/arc/ARC-Challenge-Test.jsonl", args.limit_arc_challenge)}
    for name, (tmpl, path, _) in specs.items():
        (tmp / f"{name}.yaml").write_text(tmpl.format(name=name, path=path))
    tm = TaskManager(include_path=str(tmp))
    out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to float32", "gguf_sha256": digest,
           "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
           "model_args": f"pretrained={folder},dtype=float32", "tasks": {}}
    for name, (_, path, limit) in specs.items():
        t0 = time.time()
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu",
                                      tasks=[name], task_manager=tm, limit=limit, batch_size=args.batch_size,
                                      log_samples=True)
        samples = res["samples"][name]
        per = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            rec = {"doc_id": s["doc_id"]}
            for m in ("acc", "acc_norm"):
                if m in s:
                    rec[m] = s[m]
            rec["loglik"] = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["filtered_resps"]]
            per.append(rec)
        out["tasks"][name] = {"data": str(path), "limit": limit, "metrics": res["results"][name],
                              "seconds": round(time.time() - t0, 1), "examples": per}
        print(name, json.dumps(res["results"][name]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
