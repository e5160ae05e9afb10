"""Load a model by name or path and score it: one adapter per model format."""
from __future__ import annotations

from pathlib import Path

from arfuse.adapters.base import CausalLM, Encoding, ModelInfo
from arfuse.adapters.registry import ALIASES, resolve_alias
from arfuse.errors import ArfuseError, did_you_mean

__all__ = ["CausalLM", "Encoding", "ModelInfo", "load_model"]

_LOADED: dict[tuple, CausalLM] = {}


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", tokenizer: str | None = None,
               reuse: bool = True) -> CausalLM:
    """A causal LM from a short name, a .gguf file, a llama2.c .bin, an arfuse checkpoint,
    a Hugging Face folder or a hub id. Models already loaded in this process are reused."""
    key = (spec, device, dtype, tokenizer)
    if reuse and key in _LOADED:
        return _LOADED[key]
    name = spec
    path_str = resolve_alias(spec) or spec
    if path_str == spec and "/" not in spec and not Path(spec).exists():
        hint = did_you_mean(spec.lower(), ALIASES)
        if hint:  # a near-miss of a short name, not a hub id
            raise ArfuseError(f"unknown model {spec!r}.{hint} (or give a path or a Hugging Face hub id)")
    path = Path(path_str).expanduser()
    if path.suffix == ".bin" and path.is_file():
        from arfuse.adapters.llama2c import Llama2cLM

        model: CausalLM = Llama2cLM(str(path), tokenizer=tokenizer, device=device)
    elif path.is_dir() and (path / "arfuse.json").exists() and not (path / "config.json").exists():
        from arfuse.adapters import arfuse_ckpt  # arfuse's own (RNN) checkpoints

        model = arfuse_ckpt.load(str(path), device=device)
    else:
        from arfuse.adapters.hf import HFCausalLM

        if path.suffix == ".bin" and not path.exists():
            raise ArfuseError(f"model file {spec} does not exist: check the path")
        model = HFCausalLM(str(path), device=device, dtype=dtype, name=name if resolve_alias(spec) else None)
    _LOADED[key] = model
    return model
