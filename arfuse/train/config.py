"""The training configuration: one frozen dataclass whose defaults are the paper's recipes.

Values resolve in this order, later winning: the architecture's preset (the paper's
appendix E), a TOML or JSON config file, then command-line overrides.
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from arfuse.errors import ArfuseError, did_you_mean

# Appendix E.1 (Section 5.2): the reference Transformer. The paper does not give the number of
# epochs; 3 is the default of the Hugging Face Trainer its hyperparameters come from.
PAPER_TRANSFORMER = dict(
    family="gpt2", n_layers=6, n_heads=6, embed_size=384, ffn_size=1536, hidden_size=384, activation="gelu",
    dropout=0.1, block_size=1024, tie_weights=True, optimizer="adamw", lr=5e-5, weight_decay=0.0,
    schedule="cosine", warmup=0.1, grad_clip=1.0, batch_size=2, grad_accum=4, epochs=3.0, sampling="random",
)
# Appendix E.2 (Section 5.3), after PyTorch's word_language_model: embedding size is the swept
# parameter (16 ... 1024; 200 is that script's default); gradient clipping 0.25 is the script's too.
PAPER_SMALL = dict(
    dropout=0.2, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup=0.0, grad_clip=0.25,
    batch_size=20, grad_accum=1, epochs=5.0, sampling="sequential", block_size=35, embed_size=200,
)
PRESETS: dict[str, dict] = {
    "transformer": PAPER_TRANSFORMER,
    "transformer-small": {**PAPER_SMALL, "family": "gpt2", "n_layers": 1, "n_heads": 2, "ffn_size": 128,
                          "hidden_size": 128, "activation": "relu", "tie_weights": False},
    "lstm": {**PAPER_SMALL, "hidden_size": 128, "n_layers": 1, "tie_weights": False},
    "gru": {**PAPER_SMALL, "hidden_size": 128, "n_layers": 1, "tie_weights": False},
}
ARCHS = tuple(PRESETS)
HF_ARCHS = ("transformer", "transformer-small")
FAMILIES = ("gpt2", "llama")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
# fields that change nothing in the trained weights: a rerun may change them and still resume
RUN_ONLY = {"out", "eval_every", "eval_tokens", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
            "device", "threads", "progress", "max_minutes"}


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run. ``None`` in a schedule field means "derived" (see ``trainer``)."""

    arch: str = "transformer"
    data: str = ""                  # corpus spec: kjv[:90%], tinyshakespeare[:90%], enwiki, a file
    tokenizer: str = "gpt2"         # word, gpt2, gpt-neox, smollm2-135m, a .gguf, a folder, a hub id
    out: str | None = None          # the run folder
    valid: str | None = None        # validation text; None -> the last valid_fraction of data
    valid_fraction: float = 0.05
    # model
    family: str = "gpt2"            # transformer archs: a GPT-2 or a Llama configuration
    n_layers: int = 6
    n_heads: int = 6
    embed_size: int = 384
    ffn_size: int = 1536            # transformers' feed-forward width
    hidden_size: int = 384          # LSTM/GRU state size
    activation: str = "gelu"
    dropout: float = 0.1
    block_size: int = 1024          # positions of a transformer; BPTT length of an RNN
    tie_weights: bool = True
    # vocabulary
    max_vocab: int = 10_000         # word level: at most this many words, <unk> and <eos> included
    min_freq: int = 2
    compact_vocab: bool = True      # train the output layer on tokens the corpus holds only (exact; see docs)
    # optimisation
    optimizer: str = "adamw"
    lr: float = 5e-5
    min_lr: float = 0.0             # the cosine schedule's floor
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"        # cosine (with warmup) or constant
    warmup: float = 0.1             # fraction of the optimiser steps
    grad_clip: float = 1.0          # 0 turns clipping off
    batch_size: int = 2
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None    # optimiser steps; overrides epochs when given
    max_minutes: float | None = None  # wall-clock guard: stop (validate, checkpoint, export) past it
    sampling: str = "random"        # random blocks, or sequential with the RNN state carried
    # run
    seed: int = 42
    amp: str = "auto"               # auto: bfloat16 autocast on a CUDA device that supports it; off
    device: str = "cpu"
    eval_every: int | None = None   # optimiser steps between validations; None -> 10 per run
    eval_tokens: int = 131_072      # validation tokens read per evaluation (the first ones)
    eval_batch_size: int = 10
    checkpoint_every: int | None = None  # None -> at every validation
    keep_checkpoints: int = 2
    threads: int | None = None      # torch CPU threads; None keeps torch's default

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def resolve(cls, overrides: dict | None = None, *, file: str | Path | None = None) -> TrainConfig:
        """Preset of the chosen architecture, then ``file``, then ``overrides`` (None values skipped)."""
        merged: dict = {}
        if file is not None:
            merged.update(read_config_file(file))
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        merged = {k.replace("-", "_"): v for k, v in merged.items()}
        check_keys(merged, where=str(file) if file else "the overrides")
        arch = merged.get("arch", cls.arch)
        if arch not in PRESETS:
            raise ArfuseError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}." + did_you_mean(arch, ARCHS))
        values = {**PRESETS[arch], **merged}
        cfg = cls(**{k: coerce(k, v) for k, v in values.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(name, why):
            raise ArfuseError(f"{name} = {getattr(self, name)!r}: {why}")

        if self.arch not in PRESETS:
            raise ArfuseError(f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}."
                              + did_you_mean(self.arch, ARCHS))
        if not self.data:
            raise ArfuseError("no training data: give --data (kjv[:90%], tinyshakespeare[:90%], enwiki or a text file)")
        for name in ("n_layers", "n_heads", "embed_size", "ffn_size", "hidden_size", "block_size", "batch_size",
                     "grad_accum", "max_vocab", "min_freq", "eval_tokens", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.max_minutes is not None and not self.max_minutes > 0:
            bad("max_minutes", "must be positive (or left out)")
        for name in ("max_steps", "eval_every", "checkpoint_every", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, "must be at least 1 (or left out)")
        if self.arch in HF_ARCHS:
            if self.family not in FAMILIES:
                bad("family", f"use one of {', '.join(FAMILIES)}" + did_you_mean(self.family, FAMILIES))
            if self.embed_size % self.n_heads:
                bad("embed_size", f"must be a multiple of n_heads ({self.n_heads})")
            if self.activation not in ACTIVATIONS:
                bad("activation", f"use one of {', '.join(ACTIVATIONS)}")
        elif self.tie_weights and self.embed_size != self.hidden_size:
            bad("tie_weights", f"needs embed_size == hidden_size ({self.embed_size} vs {self.hidden_size}); "
                               "set tie_weights = false")
        if self.block_size < 2 and self.sampling == "random":
            bad("block_size", "must be at least 2")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number")
        if self.optimizer not in ("adamw", "adam"):
            bad("optimizer", "use adamw or adam")
        if self.schedule not in ("cosine", "constant"):
            bad("schedule", "use cosine or constant")
        if not 0 <= self.warmup < 1:
            bad("warmup", "is a fraction of the steps in [0, 1)")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 turns clipping off)")
        if not self.epochs > 0:
            bad("epochs", "must be positive")
        if self.sampling not in ("random", "sequential"):
            bad("sampling", "use random or sequential")
        if self.amp not in ("auto", "off", "bf16"):
            bad("amp", "use auto, off or bf16")

    # ---- views ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields that determine the trained weights (with the data and tokenizer hashes)."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}

    @property
    def is_hf(self) -> bool:
        return self.arch in HF_ARCHS


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def base_type(tp) -> tuple[type, bool]:
    """(int|float|str|bool, optional?) of a field's annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def check_keys(d: dict, *, where: str) -> None:
    known = _field_types()
    for k in d:
        if k not in known:
            raise ArfuseError(f"unknown training option {k!r} in {where}." + did_you_mean(k, known)
                              + " (arfuse train --help lists them all)")


def coerce(name: str, value):
    """A value of the field's type, from a config file or a command-line string."""
    tp, optional = base_type(_field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ArfuseError(f"{name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ArfuseError(f"{name} = {value!r} is not a valid {tp.__name__}") from None


def read_config_file(path: str | Path) -> dict:
    """A flat table of options from a .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ArfuseError(f"config file {path} does not exist: check the path")
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArfuseError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix it") from None
    elif path.suffix == ".toml":
        d = load_toml(path)
    else:
        raise ArfuseError(f"config file {path} must end in .toml or .json")
    if not isinstance(d, dict):
        raise ArfuseError(f"{path} must hold a table of options")
    return d


def load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ArfuseError("reading TOML on Python 3.10 needs the tomli package: pip install tomli, "
                              "or use a JSON config") from None
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ArfuseError(f"{path} is not valid TOML: {e}") from None
