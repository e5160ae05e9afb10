"""Run lm-evaluation-harness itself on SmolLM2-135M, offline, on the same local files arfuse reads.

    .venv/bin/pip install -e '.[lm-eval]'     # once: lm-eval==0.4.13
    .venv/bin/python benchmarks/lm_eval_compare.py [--limit-lambada 200] [--limit-arc-easy 200] [--only wikitext]

Tasks are arfuse's local lm-eval configs (arfuse/serve/lm_eval_tasks, the folder `arfuse lm-eval`
adds as --include_path): lm-eval's own lambada_openai, arc_easy and arc_challenge definitions (same
prompt: LAMBADA context = the passage without its last word, target = " " + last word; ARC
"Question: {stem}\\nAnswer:" with each choice as " {text}"), read from ../shared/data instead of the
hub, and arfuse_wikitext, lm-eval's rolling log-likelihood over a WikiText-2 text. The model is the
GGUF file's float32 dequantisation that arfuse caches (the same weights arfuse scores).

The wikitext row is the parity check of arfuse's `disjoint` convention: lm-eval's `hf` model
(max_length = the window) on the first --wikitext-chars characters of wiki.test.raw as one document,
beside `arfuse score smollm2-135m 'wiki.test.raw[:N]' --convention disjoint --window W`, on the very
same text (no detokenizer on either side; words are runs of non-space characters, bytes UTF-8).
Writes benchmarks/results/lm_eval_smollm2.json: lm-eval's metrics and per-example results, and the
wikitext row with both sets of numbers (a run with --only keeps the other rows of an existing file).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

ARFUSE = ROOT / ".venv" / "bin" / "arfuse"


def arfuse_cmd() -> list[str]:
    """The `arfuse` command of this environment."""
    exe = Path(sys.executable).parent / "arfuse"
    return [str(exe if exe.exists() else ARFUSE)]


def wikitext_row(args, folder: Path, TaskManager, lm_eval) -> dict:
    """lm-eval's hf model and `arfuse score --convention disjoint` on the same text: both sets of numbers."""
    from arfuse.paths import shared_data_root
    from arfuse.serve.harness import task_dir

    spec = f"{shared_data_root() / 'text/wikitext-2/wiki.test.raw'}[:{args.wikitext_chars}]"
    t0 = time.time()
    tm = TaskManager(include_path=str(task_dir()), metadata={"wikitext_data": spec, "wikitext_documents": "one"})
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu,"
                                  f"max_length={args.window}", tasks=["arfuse_wikitext"], task_manager=tm,
                                  batch_size=args.batch_size)
    theirs = {k.split(",")[0]: v for k, v in res["results"]["arfuse_wikitext"].items() if k.endswith(",none")}
    t_lm = time.time() - t0
    from transformers import AutoTokenizer

    from arfuse.data.text import load_dataset

    text = load_dataset(spec).documents[0]
    n_lm = len(AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"])  # lm-eval scores every one
    t0 = time.time()
    cmd = arfuse_cmd() + ["score", "smollm2-135m", spec, "--convention", "disjoint", "--window", str(args.window),
                          "--batch-size", str(args.batch_size), "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"arfuse score failed: {out.stderr}")
    ours = json.loads(out.stdout)
    t_ar = time.time() - t0

    def sig4(x: float, y: float) -> bool:
        return f"{x:.4g}" == f"{y:.4g}"

    row = {"data": spec, "documents": 1, "chars": len(text), "window": args.window,
           "lm_eval": {"command": f"simple_evaluate(model='hf', model_args='pretrained=<float32 folder>,dtype=float32,"
                                  f"max_length={args.window}', tasks=['arfuse_wikitext'], batch_size={args.batch_size}) "
                                  "with metadata wikitext_documents=one",
                       "word_perplexity": theirs.get("word_perplexity"), "bits_per_byte": theirs.get("bits_per_byte"),
                       "byte_perplexity": theirs.get("byte_perplexity"), "tokens_scored": n_lm,
                       "seconds": round(t_lm, 1)},
           "arfuse": {"command": " ".join(["arfuse"] + cmd[1:]), "word_perplexity": ours["word_ppl"],
                      "bits_per_byte": ours["bits_per_byte"], "tokens_scored": ours["tokens"], "words": ours["words"],
                      "bytes": ours["bytes"], "windowing": ours["windowing"], "bos": ours["bos"],
                      "seconds": round(t_ar, 1)}}
    row["relative_difference"] = {m: abs(row["arfuse"][m] / row["lm_eval"][m] - 1)
                                  for m in ("word_perplexity", "bits_per_byte")}
    row["equal_to_4_significant_digits"] = all(sig4(row["arfuse"][m], row["lm_eval"][m])
                                               for m in ("word_perplexity", "bits_per_byte"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-lambada", type=int, default=100)
    ap.add_argument("--limit-arc-easy", type=int, default=100)
    ap.add_argument("--limit-arc-challenge", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--wikitext-chars", type=int, default=200_000, help="first N characters of wiki.test.raw")
    ap.add_argument("--window", type=int, default=1024, help="lm-eval's max_length and arfuse's --window")
    ap.add_argument("--only", choices=["wikitext", "tasks"], help="run only the wikitext row, or only the tasks")
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
    from arfuse.serve.harness import task_dir

    data = shared_data_root()
    specs = {"arfuse_lambada_openai": (data / "text/lambada/lambada_test.jsonl", args.limit_lambada),
             "arfuse_arc_easy": (data / "mc/arc/ARC-Easy-Test.jsonl", args.limit_arc_easy),
             "arfuse_arc_challenge": (data / "mc/arc/ARC-Challenge-Test.jsonl", args.limit_arc_challenge)}
    tm = TaskManager(include_path=str(task_dir()))
    old = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else {}
    out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to float32", "gguf_sha256": digest,
           "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
           "model_args": f"pretrained={folder},dtype=float32", "tasks": old.get("tasks", {})}
    if "wikitext_disjoint" in old:
        out["wikitext_disjoint"] = old["wikitext_disjoint"]
    if args.only == "wikitext":
        specs = {}
    for name, (path, limit) in specs.items():
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
    if args.only != "tasks":
        row = out["wikitext_disjoint"] = wikitext_row(args, folder, TaskManager, lm_eval)
        print("wikitext", json.dumps({k: row[k] for k in ("lm_eval", "arfuse", "equal_to_4_significant_digits")}),
              flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
