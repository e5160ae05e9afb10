"""Shared fixtures: tiny Hugging Face models built in-process once per session, no downloads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from arfuse.paths import shared_data_root

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "In the beginning was the word, and the word was with God. Café naïve résumé — 日本語. "
) * 20


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own score cache unless it asks for a shared one."""
    monkeypatch.setenv("ARFUSE_CACHE", str(tmp_path_factory.mktemp("cache")))
    from arfuse import adapters

    adapters._LOADED.clear()
    yield


def _tokenizer(vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TRAIN_TEXT], vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


def build_tiny_lm(folder: Path, *, seed: int, layers: int = 2, hidden: int = 32, vocab_size: int = 320) -> Path:
    """A random LlamaForCausalLM with a byte-level BPE tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper, less uniform distributions than the default init
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "large": str(build_tiny_lm(root / "large", seed=0, layers=2, hidden=48)),
        "small": str(build_tiny_lm(root / "small", seed=1, layers=1, hidden=16)),
        "small2": str(build_tiny_lm(root / "small2", seed=2, layers=1, hidden=24)),
        "othervocab": str(build_tiny_lm(root / "othervocab", seed=3, layers=1, hidden=16, vocab_size=300)),
    }


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: OpenMP's spinning threads make small models and small
    convolutions slower, not faster, on a shared 2-core machine; results do not depend on it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_pair(tiny_models):
    """The tiny large and small models, loaded."""
    from arfuse.adapters import load_model

    return load_model(tiny_models["large"]), load_model(tiny_models["small"])


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(TRAIN_TEXT[:3000], encoding="utf-8")
    return str(p)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip(reason="../shared/data is not available (set ARFUSE_DATA)")
    return root


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_extra(module: str, extra: str, install: str | None = None, find_only: bool = False):
    """``module`` of the optional extra ``extra``: skipped with the install command where it is not
    installed, but a failure in CI, where `make test` installs every extra (no silent green run).
    ``install`` names another way in, for a package the Makefile installs outside the extras;
    ``find_only``: the package is only looked up, not imported (a data package with unmet imports)."""
    import importlib
    import importlib.util
    import os

    try:
        if find_only:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"no module named {module!r}")
            return module
        return importlib.import_module(module)
    except ImportError as e:
        how = install or f"the extra {extra!r}: pip install -e '.[{extra}]'"
        why = f"{module} is not installed ({how}): {e}"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; `make test` installs it in CI", pytrace=False)
        pytest.skip(why, allow_module_level=True)
