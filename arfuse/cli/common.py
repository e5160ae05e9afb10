"""Options shared by subcommands."""
from __future__ import annotations

import argparse

from arfuse.scoring.windows import CONVENTIONS  # numpy only: `arfuse --help` must not import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights' dtype; scores are always float32 log-softmax (default: float32)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (results do not depend on it)")


def add_score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--stride", type=int, default=512, help="sliding convention: tokens between window starts (default: 512)")
    p.add_argument("--convention", choices=CONVENTIONS, default="sliding",
                   help="sliding: Hugging Face perplexity guide; disjoint: lm-evaluation-harness rolling windows")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                   help="prepend BOS: auto follows each tokenizer's default (default: auto)")
    p.add_argument("--topk", type=int, default=32, help="top-k tokens kept per position in the cache (default: 32)")
    p.add_argument("--no-cache", action="store_true", help="score without reading or writing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def score_config(args):
    from arfuse.scoring.scorer import ScoreConfig

    return ScoreConfig(window=args.window, stride=args.stride, convention=args.convention, bos=args.bos, topk=args.topk)
