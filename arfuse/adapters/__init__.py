"""Load a model by name or path: one adapter per model format, found through the backend
registry (``arfuse.adapters.registry``). Adapters load and score; nothing else."""
from __future__ import annotations

from pathlib import Path

from arfuse.adapters.aliases import ALIASES, resolve_alias
from arfuse.adapters.base import CausalLM, Encoding, ModelInfo
from arfuse.adapters.registry import BACKENDS, Backend, backend_for, register_backend
from arfuse.errors import ArfuseError, did_you_mean

__all__ = ["CausalLM", "Encoding", "ModelInfo", "load_model", "load_any", "head_of", "Backend", "BACKENDS",
           "register_backend", "backend_for"]

_LOADED: dict[tuple, object] = {}


def _resolve(spec: str) -> str:
    """The local path of a short name, else ``spec``; a near-miss of a short name fails with the fix."""
    path_str = resolve_alias(spec) or spec
    if path_str == spec and backend_for(spec).name != "hf":  # a name another backend knows (resnet20, esm2-...)
        return spec
    if path_str == spec and "/" not in spec and not Path(spec).exists():
        hint = did_you_mean(spec.lower(), ALIASES)
        if hint:  # a near-miss of a short name, not a hub id
            raise ArfuseError(f"unknown model {spec!r}.{hint} (or give a path or a Hugging Face hub id)")
    return path_str


def head_of(spec: str) -> str:
    """The evaluation head of the model ``spec`` names ("causal", "image" or "masked"), without loading it."""
    return backend_for(_resolve(spec)).head


def load_any(spec: str, *, device: str = "cpu", dtype: str = "float32", tokenizer: str | None = None,
             reuse: bool = True):
    """A model of any head from a short name, a file, a folder or a hub id, through the first
    backend that recognises it. Models already loaded in this process are reused."""
    key = (spec, device, dtype, tokenizer)
    if reuse and key in _LOADED:
        return _LOADED[key]
    path = _resolve(spec)
    if Path(path).suffix == ".bin" and not Path(path).expanduser().exists():
        raise ArfuseError(f"model file {spec} does not exist: check the path")
    model = backend_for(path).open(path, device=device, dtype=dtype, tokenizer=tokenizer,
                                   name=spec if resolve_alias(spec) else None)
    _LOADED[key] = model
    return model


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", tokenizer: str | None = None,
               reuse: bool = True) -> CausalLM:
    """A causal LM from a short name, a .gguf file, a llama2.c .bin, an arfuse checkpoint, a
    Hugging Face folder or a hub id (``load_any`` for image classifiers and masked LMs too)."""
    backend = backend_for(_resolve(spec))
    if backend.head != "causal":
        raise ArfuseError(f"{spec} is a{'n' if backend.head[0] in 'aeiou' else ''} {backend.head} model "
                          f"({backend.summary}): this needs a causal language model")
    return load_any(spec, device=device, dtype=dtype, tokenizer=tokenizer, reuse=reuse)
