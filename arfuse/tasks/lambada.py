"""LAMBADA: predict a passage's last word, as lm-evaluation-harness's lambada_openai does.

Context = the passage without its last space-separated word; target = " " + that word.
A model is right when every token of the target is its argmax given the context and the
target's earlier tokens (lm-eval's ``is_greedy``); perplexity is exp of minus the mean,
over passages, of the target's summed log-likelihood (lm-eval's ``perplexity``
aggregation). The fused model is right when every target token is the fused argmax: one
interval of k per passage (``arfuse.search.accuracy.combine_groups``). Any other registered
rule of one vocabulary needs full distributions at the target tokens: one forward per passage
and model (``rule_fit``, ``rule_results``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arfuse.data.text import read_jsonl
from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Fit, Rule
from arfuse.progress import token_progress

MAX_FIT_BYTES = 3 * 2 ** 30


@dataclass
class LambadaExample:
    context: str
    target: str
    where: str


def read_lambada(path: str | Path, limit: int | None = None) -> list[LambadaExample]:
    """One JSON object ``{"text": ...}`` a line; a line that is not names itself."""
    out: list[LambadaExample] = []
    for where, obj in read_jsonl(path):
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


def _distributions(models, pairs, conts, cfg, idx, *, progress: bool, what: str):
    """Per request of ``idx``: (i, each model's log-probs (n_i, V) at its target tokens, the targets).
    ``pairs``/``conts``: each model's requests and their cached records (the LLM first)."""
    from arfuse.tasks.loglik import continuation_distributions

    idx = list(idx)
    streams = [continuation_distributions(m, p, c, cfg, idx) for m, p, c in zip(models, pairs, conts)]
    with token_progress(f"full distributions of {', '.join(m.info.name for m in models)} ({what})", len(idx),
                        enabled=progress, unit="passages") as advance:
        for items in zip(*streams):
            if any(not torch.equal(t, items[0][2]) for _, _, t in items[1:]):
                raise ArfuseError(f"passage {items[0][0]}: the models tokenize its last word differently")
            yield items[0][0], [lp for _, lp, _ in items], items[0][2]
            advance(1)


def rule_fit(rule: Rule, models, pairs, conts, cfg, valid: np.ndarray, *, progress: bool = True) -> Fit:
    """``rule`` with its missing parameters found on the passages ``valid`` (NLL of their target
    tokens; their full distributions are held in memory)."""
    n_tok = int(conts[0].n_tokens()[valid].sum())
    need = n_tok * models[0].info.vocab_size * 4 * len(models)
    if need > MAX_FIT_BYTES:
        raise ArfuseError(f"choosing the {rule.name} rule's {', '.join(rule.missing())} holds the full distributions "
                          f"of {n_tok:,} validation target tokens ({need / 2 ** 30:.1f} GiB): give a smaller "
                          f"--valid-split or {rule.flags(rule.missing())}")
    held: list[list[torch.Tensor]] = [[] for _ in models]
    targets = []
    for _, lps, t in _distributions(models, pairs, conts, cfg, valid, progress=progress, what="validation part"):
        for h, lp in zip(held, lps):
            h.append(lp)
        targets.append(t)
    return rule.fit([torch.cat(h) for h in held], torch.cat(targets))


def rule_results(rule: Rule, models, pairs, conts, cfg, idx: np.ndarray, *,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per passage of ``idx``: right under ``rule`` (every target token the fused argmax) and the
    fused log-likelihood of its target (float64)."""
    right = np.zeros(len(idx), bool)
    loglik = np.zeros(len(idx))
    for j, (_, lps, t) in enumerate(_distributions(models, pairs, conts, cfg, idx, progress=progress,
                                                   what="reported part")):
        right[j] = bool((rule(lps).argmax(-1) == t).all())
        loglik[j] = float(rule.target_logprobs(lps, t).sum())
    return right, loglik
