"""The model backends arfuse knows: each a loader registered with the test that recognises its
input and the evaluation head its models have ("causal" LMs, "image" classifiers, "masked" LMs).

A spec (after short names such as ``smollm2-135m`` resolve to local paths) goes to the first
backend whose test accepts it; transformers, last, takes anything left (a folder, a .gguf file
or a hub id). Tests look at names and paths only, never load weights. Adding a backend (an
inference engine, a remote model) is one file with its adapter and one line in ``BACKENDS``,
or ``register_backend(...)`` from user code, in the manner of lm-evaluation-harness's model
registry.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class Backend:
    name: str
    head: str                         # which evaluation head its models have: "causal", "image", "masked"
    #                                   (arfuse.tasks.heads.HEADS says which module evaluates each)
    recognises: Callable[[str], bool] | str   # the test on a (resolved) spec, or "module:function"
    load: Callable[..., object] | str         # load(spec, *, device, dtype, **kw) -> model, or "module:function"
    summary: str = ""

    def accepts(self, spec: str) -> bool:
        return bool(_resolve(self.recognises)(spec))

    def open(self, spec: str, **kw):
        return _resolve(self.load)(spec, **kw)


def _resolve(fn):
    if callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- the tests of the built-in backends (paths and names only) --------------------------------
def is_llama2c_file(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.suffix == ".bin" and p.is_file()


def is_arfuse_checkpoint(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.is_dir() and (p / "arfuse.json").exists() and not (p / "config.json").exists()


def _anything(spec: str) -> bool:
    return True


# ---- their loaders: load(spec, *, device, dtype, tokenizer, name) -----------------------------
def _vision(spec, *, device="cpu", **_):
    from arfuse.adapters.vision import load_vision_model

    return load_vision_model(spec, device=device)


def _protein(spec, *, device="cpu", **_):
    from arfuse.adapters.protein import load_protein_model

    return load_protein_model(spec, device=device)


def _llama2c(spec, *, device="cpu", tokenizer=None, **_):
    from arfuse.adapters.llama2c import Llama2cLM

    return Llama2cLM(spec, tokenizer=tokenizer, device=device)


def _arfuse(spec, *, device="cpu", **_):
    from arfuse.adapters.arfuse_ckpt import load

    return load(spec, device=device)


def _hf(spec, *, device="cpu", dtype="float32", name=None, **_):
    from arfuse.adapters.hf import HFCausalLM

    return HFCausalLM(spec, device=device, dtype=dtype, name=name)


# asked in this order; the first backend whose test accepts a spec loads it
BACKENDS: list[Backend] = [
    Backend("vllm", "causal", "arfuse.adapters.vllm:is_vllm_spec", "arfuse.adapters.vllm:load_vllm",
            "vLLM on a CUDA GPU: vllm:HUB_ID or vllm:FOLDER, scoring through prompt_logprobs (pip install -e '.[vllm]')"),
    Backend("llamacpp", "causal", "arfuse.adapters.llamacpp:is_llamacpp_spec", "arfuse.adapters.llamacpp:load_llamacpp",
            "llama.cpp: llamacpp:PATH.gguf or llamacpp:NAME, the quantised weights as they are (llama-cpp-python)"),
    Backend("vision", "image", "arfuse.adapters.vision:is_vision_model", _vision,
            "image classifiers: CIFAR ResNets (names, .th files), torchvision:/timm: models"),
    Backend("protein", "masked", "arfuse.adapters.protein:is_protein_model", _protein,
            "ESM-2 protein masked LMs (names, hub ids, folders)"),
    Backend("llama2c", "causal", is_llama2c_file, _llama2c,
            "llama2.c checkpoints (.bin), with their tokenizer"),
    Backend("arfuse", "causal", is_arfuse_checkpoint, _arfuse,
            "arfuse's own LSTM/GRU checkpoints (a folder with arfuse.json)"),
    Backend("hf", "causal", _anything, _hf,
            "transformers: Hugging Face folders, hub ids, .gguf files"),
]


def register_backend(backend: Backend, *, before: str | None = "hf") -> Backend:
    """Add ``backend``; it is asked before the backend named ``before`` (default: before the
    transformers fallback), or last with ``before=None``. A backend of the same name is replaced."""
    if not backend.head or not isinstance(backend.head, str):
        raise ValueError(f"backend {backend.name!r}: give the head its models have (e.g. 'causal'), "
                         f"not {backend.head!r}")
    BACKENDS[:] = [b for b in BACKENDS if b.name != backend.name]
    at = next((i for i, b in enumerate(BACKENDS) if b.name == before), len(BACKENDS))
    BACKENDS.insert(at, backend)
    return backend


def backend_for(spec: str) -> Backend:
    """The backend that loads ``spec`` (a resolved path, a name or a hub id)."""
    return next(b for b in BACKENDS if b.accepts(spec))
