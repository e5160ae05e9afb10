"""The evaluation heads: which code evaluates a model of each kind, found through the backend
registry (``arfuse.adapters.head_of``), and the one ``evaluate(config)`` over all of them.

A head is one module with ``evaluate_...(cfg, *, progress) -> EvalReport`` and
``describe(report) -> str`` (the report as text); adding one is that file and one line in ``HEADS``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from arfuse.errors import ArfuseError
from arfuse.tasks.config import EvalConfig
from arfuse.tasks.report import EvalReport

# head (arfuse.adapters.registry's Backend.head) -> "module:function" that evaluates it
HEADS: dict[str, str] = {
    "causal": "arfuse.tasks.perplexity:evaluate_perplexity",
    "image": "arfuse.tasks.classification:evaluate_classification",
    "masked": "arfuse.tasks.masked_lm:evaluate_masked_lm",
}
KINDS = {"causal": "causal language models", "image": "image classifiers", "masked": "masked language models"}


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


def _head_module(head: str):
    return importlib.import_module(HEADS[head].partition(":")[0])


def head_function(head: str) -> Callable[..., EvalReport]:
    return getattr(_head_module(head), HEADS[head].partition(":")[2])


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> EvalReport:
    """Score every model once (cached), then fuse, search and report on the cached records, with
    the head the models have (perplexity for causal LMs, accuracy for image classifiers,
    masked-position perplexity for masked LMs)."""
    return head_function(head_for([cfg.large, *cfg.smalls]))(cfg, progress=progress)


def describe(report: EvalReport) -> str:
    """The report as text, written by its head."""
    return _head_module(report.head).describe(report)


def refuse_rule(cfg: EvalConfig, head: str) -> None:
    """Heads whose records hold whole distributions over classes are fused with the linear rule."""
    if cfg.rule == "linear":
        return
    from arfuse.fusion.registry import get_rule

    rule = get_rule(cfg.rule)
    why = (" (it reads token embeddings: it fuses next-token distributions of causal LMs only)"
           if getattr(rule, "over_tokens", False) else "")
    raise ArfuseError(f"the {cfg.rule} rule is not applied to {KINDS[head]}{why}: they are fused with the linear "
                      "rule; drop --rule, or use --rule linear")
