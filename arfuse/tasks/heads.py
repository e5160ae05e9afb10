"""The evaluation heads: which code evaluates a model of each kind, found through the backend
registry (``arfuse.adapters.head_of``), and the one ``evaluate(config)`` over all of them.

A head is one module with ``KIND`` (what its models are, for messages), ``evaluate(cfg, *, progress)
-> EvalReport``, ``describe(report) -> str`` (the report as text) and ``family_members(specs, data,
*, score_cfg, mask, device, dtype, batch_size, use_cache, progress)`` (records for the AR law); adding
one is that file and one line in ``HEADS`` (and a backend whose ``head`` names it).
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

from arfuse.errors import ArfuseError
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.report import EvalReport

# head (arfuse.adapters.registry's Backend.head) -> the module that evaluates its models
HEADS: dict[str, str] = {
    "causal": "arfuse.tasks.perplexity",
    "image": "arfuse.tasks.classification",
    "masked": "arfuse.tasks.masked_lm",
}


def head_for(specs: Sequence[str]) -> str:
    """The one head of every model in ``specs`` (without loading them); models of mixed heads are refused."""
    from arfuse.adapters import head_of

    heads = {s: head_of(s) for s in specs}
    kinds = set(heads.values())
    if len(kinds) > 1:
        which = ", ".join(f"{s} is {'an' if h[0] in 'aeiou' else 'a'} {h} model" for s, h in heads.items())
        raise ArfuseError(f"the models are of different kinds ({which}): fusion mixes the probabilities of one "
                          "kind of output, so give models of one kind (all causal LMs, all image classifiers with "
                          "the same classes, or all masked LMs)")
    head = kinds.pop()
    if head not in HEADS:
        raise ArfuseError(f"no evaluation head for {head} models: the heads are {', '.join(HEADS)}")
    return head


def head_module(head: str):
    """The module of ``head``: its ``KIND``, ``evaluate``, ``describe`` and ``family_members``."""
    return importlib.import_module(HEADS[head])


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Score every model once (cached), then fuse, search and report on the cached records, with
    the head the models have (perplexity for causal LMs, accuracy for image classifiers,
    masked-position perplexity for masked LMs)."""
    return head_module(head_for([cfg.large, *cfg.smalls])).evaluate(cfg, progress=progress)


def describe(report: EvalReport) -> str:
    """The report as text, written by its head."""
    return head_module(report.head).describe(report)


def refuse_rule(cfg: EvalConfig, head: str) -> None:
    """Heads whose records hold whole distributions over classes are fused with the linear rule."""
    if cfg.rule == "linear":
        return
    from arfuse.fusion.registry import get_rule

    rule = get_rule(cfg.rule)
    why = (" (it reads token embeddings: it fuses next-token distributions of causal LMs only)"
           if getattr(rule, "over_tokens", False) else "")
    raise ArfuseError(f"the {cfg.rule} rule is not applied to {head_module(head).KIND}{why}: they are fused with the linear "
                      "rule; drop --rule, or use --rule linear")
