"""arfuse: fuse a large model with smaller ones at the level of their output distributions.

The Python API (every name is imported on first use, so ``import arfuse`` stays cheap):

- ``load_model(spec)``, ``load_dataset(spec)``: a model by short name, path or hub id; a data set
  by name or path, with an optional ``[a:b]`` character slice
- ``score(model, dataset, ScoreConfig(...))``: per-token records, scored once and cached
- ``segment_records(records, dataset)``, ``optimal_weight(lp_large, lp_small)``,
  ``improvement_domain``, ``mixture_nll``: the exact search on cached records
- ``evaluate(EvalConfig(...))``: the whole evaluation of ``arfuse eval`` / ``arfuse task``
- ``generate(prompt, large=..., small=..., weight=...)``: text from the fused model
- ``serve(...)``: the OpenAI-compatible HTTP server (the extra ``serve``)
"""

from arfuse.version import __version__

_LAZY = {  # name -> module that defines it
    "load_model": "arfuse.adapters",
    "load_dataset": "arfuse.data.text",
    "Dataset": "arfuse.data.text",
    "score": "arfuse.scoring.scorer",
    "ScoreConfig": "arfuse.scoring.scorer",
    "TokenRecords": "arfuse.scoring.records",
    "segment_records": "arfuse.scoring.segments",
    "optimal_weight": "arfuse.search",
    "optimal_weights_em": "arfuse.search",
    "improvement_domain": "arfuse.search",
    "mixture_nll": "arfuse.search",
    "evaluate": "arfuse.tasks",
    "EvalConfig": "arfuse.tasks",
    "EvalReport": "arfuse.tasks",
    "generate": "arfuse.generation",
    "serve": "arfuse.serve.server",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'arfuse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
