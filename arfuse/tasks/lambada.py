"""LAMBADA: predict a passage's last word, as lm-evaluation-harness's lambada_openai does.

Context = the passage without its last space-separated word; target = " " + that word.
A model is right when every token of the target is its argmax given the context and the
target's earlier tokens (lm-eval's ``is_greedy``); perplexity is exp of minus the mean,
over passages, of the target's summed log-likelihood (lm-eval's ``perplexity``
aggregation). The fused model is right when every target token is the fused argmax: one
interval of k per passage (``arfuse.search.accuracy.combine_groups``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.errors import ArfuseError


@dataclass
class LambadaExample:
    context: str
    target: str
    where: str


def read_lambada(path: str | Path, limit: int | None = None) -> list[LambadaExample]:
    """One JSON object ``{"text": ...}`` a line; a line that is not names itself."""
    path = Path(path)
    out: list[LambadaExample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArfuseError(f"{where}: not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ArfuseError(f"{where}: each line needs a \"text\" field holding the passage")
            words = obj["text"].split(" ")
            if len(words) < 2 or not words[-1]:
                raise ArfuseError(f"{where}: the passage needs a context and a last word separated by a space")
            out.append(LambadaExample(" ".join(words[:-1]), " " + words[-1], where))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ArfuseError(f"{path} holds no passages")
    return out


def requests(examples: list[LambadaExample]) -> list[tuple[str, str]]:
    return [(e.context, e.target) for e in examples]


def word_metrics(loglik: np.ndarray, right: np.ndarray) -> dict:
    """acc and perplexity from each passage's target log-likelihood and greedy correctness."""
    return {"acc": float(np.mean(right)), "perplexity": math.exp(-float(np.mean(loglik))), "n": int(len(right))}
