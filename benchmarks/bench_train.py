"""Training throughput of arfuse's trainer beside a minimal plain-PyTorch loop: same model,
same data, same batches, in one run.

For each architecture, tokens per second of `arfuse.train.train` over its optimiser steps
(validation and checkpoint writing are timed apart and reported separately) and of a plain
loop (forward, cross-entropy, backward, clip, step) over the same module, optimiser and
batches, prepared before its clock starts. This CPU is shared, so the two alternate for
--rounds rounds and each keeps its best round. Passes when arfuse is within 10% of plain.

Usage: python benchmarks/bench_train.py [--rounds 2] [--seconds 12] [--chars 400000]
Writes benchmarks/results/bench_train.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# model and data of each row: the demo's Transformer on SmolLM2's tokenizer, the paper's 5.3 recipes
SETUPS = {
    "transformer": dict(arch="transformer", tokenizer="smollm2-135m", n_layers=2, n_heads=4, embed_size=128,
                        ffn_size=512, block_size=1024, batch_size=2, grad_accum=1, dropout=0.0, lr=3e-3),
    "transformer-small": dict(arch="transformer-small", tokenizer="word", embed_size=200),
    "lstm": dict(arch="lstm", tokenizer="word", embed_size=200),
    "gru": dict(arch="gru", tokenizer="word", embed_size=200),
}


def make_config(name: str, data: str, valid: str, steps: int, out: Path):
    from arfuse.train import TrainConfig

    return TrainConfig.resolve({**SETUPS[name], "data": data, "valid": valid, "max_steps": steps,
                                "eval_every": steps, "eval_tokens": 2048, "threads": 1, "out": str(out)})


def run_arfuse(cfg) -> dict:
    from arfuse.train import train

    t0 = time.perf_counter()
    res = train(cfg, progress=False, log=lambda *a, **k: None)
    wall = time.perf_counter() - t0
    return {"tokens": res.tokens, "step_seconds": res.step_seconds, "tok_s": res.tokens / res.step_seconds,
            "wall_seconds": wall, "val_loss": res.val_loss}


def run_plain(cfg) -> dict:
    """The plain loop: the same module, optimiser, loss and batches; nothing else."""
    from arfuse.train.models import TrainModel, VocabMap
    from arfuse.train.batches import Batches
    from arfuse.train.trainer import prepare

    prep = prepare(cfg)
    vmap = VocabMap.build(prep.tokenizer.vocab_size, prep.train_ids, cfg.compact_vocab)
    ids = torch.from_numpy(vmap.to_model(prep.train_ids))
    batches = Batches(ids, cfg.batch_size, cfg.block_size, cfg.sampling, cfg.seed)
    data = [batches.get_batch(i) for i in range(cfg.max_steps * cfg.grad_accum)]  # prepared before the clock
    offset = vmap.target_correction()
    torch.manual_seed(cfg.seed)
    model = TrainModel(cfg, vmap.model_size).train()
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                  weight_decay=cfg.weight_decay if cfg.optimizer == "adamw" else 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    state, tokens = None, 0
    t0 = time.perf_counter()
    for x, y, new_epoch in data:
        if new_epoch or not model.stateful:
            state = None
        logits, state = model(x, state)
        logits = logits.float()
        if offset:
            logits[..., -1] += offset
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if model.stateful:
            state = model.net.detach_state(state)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += y.numel()
    dt = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {"tokens": tokens, "step_seconds": dt, "tok_s": tokens / dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per architecture (best kept)")
    ap.add_argument("--seconds", type=float, default=12.0, help="target seconds of training per measurement")
    ap.add_argument("--chars", type=int, default=400_000, help="characters of the King James Bible to train on")
    ap.add_argument("--only", action="append", choices=list(SETUPS), help="architectures to run (default: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_train.json"))
    args = ap.parse_args()

    data, valid = f"kjv[:{args.chars}]", f"kjv[{args.chars}:{args.chars + 20000}]"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(SETUPS):
            # size the run: a 3-step probe of the plain loop gives the seconds per step
            probe = run_plain(make_config(name, data, valid, 3, Path(tmp) / f"{name}-probe"))
            per_step = probe["step_seconds"] / 3
            steps = max(5, int(args.seconds / per_step))
            ours, plain = [], []
            for r in range(args.rounds):
                ours.append(run_arfuse(make_config(name, data, valid, steps, Path(tmp) / f"{name}-{r}")))
                plain.append(run_plain(make_config(name, data, valid, steps, Path(tmp) / f"{name}-plain{r}")))
            best_ours = max(ours, key=lambda d: d["tok_s"])
            best_plain = max(plain, key=lambda d: d["tok_s"])
            ratio = best_ours["tok_s"] / best_plain["tok_s"]
            overhead = best_ours["wall_seconds"] - best_ours["step_seconds"]
            row = {"arch": name, "setup": SETUPS[name], "steps": steps, "tokens": best_ours["tokens"],
                   "arfuse_tok_s": round(best_ours["tok_s"], 1), "plain_tok_s": round(best_plain["tok_s"], 1),
                   "ratio": round(ratio, 4), "within_10pct": ratio >= 0.9,
                   "arfuse_rounds_tok_s": [round(d["tok_s"], 1) for d in ours],
                   "plain_rounds_tok_s": [round(d["tok_s"], 1) for d in plain],
                   "arfuse_other_seconds": round(overhead, 2)}
            rows.append(row)
            print(f"{name:18s} arfuse {row['arfuse_tok_s']:>9,.0f} tok/s   plain {row['plain_tok_s']:>9,.0f} tok/s   "
                  f"ratio {ratio:.3f}  {'ok' if row['within_10pct'] else 'SLOWER THAN 10%'}   "
                  f"(+{overhead:.1f} s outside steps: data, model build, validation, checkpoint, export)", flush=True)
    result = {"benchmark": "bench_train", "data": data, "threads": 1, "rounds": args.rounds,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__},
              "rows": rows, "all_within_10pct": all(r["within_10pct"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"all within 10%: {result['all_within_10pct']}; wrote {args.out}")
    return 0 if result["all_within_10pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
