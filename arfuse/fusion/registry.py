"""The fusion rules arfuse knows, by name: the one extension point every command reads.

A rule is a class (``Rule``) that says what it needs (one tokenizer or any, full distributions
or only log p(target), how many models, weights or not, its own parameters with their checks)
and one call from the models' log-probs (the LLM first) to the fused log-probs. Registering
it makes it a choice of ``arfuse eval``, ``arfuse task`` and ``arfuse generate`` and of the
Python API; every message that names rules reads them from here.

Adding a rule is one file with the class and one line: ``RULES`` below for a built-in rule
(module path and class name, imported on first use), ``register_rule(MyRule)`` from user code,
or an entry point in the group ``arfuse.rules`` of an installed package (then the ``arfuse``
command line knows it too). mergekit registers its merge methods the same way.
"""
from __future__ import annotations

import copy
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from arfuse.errors import ArfuseError, did_you_mean

# name -> "module:Class" of the built-in rules (imported when first asked for)
RULES: dict[str, str] = {
    "linear": "arfuse.fusion.linear:LinearRule",
    "cosine": "arfuse.fusion.cosine:CosineRule",
    "union": "arfuse.fusion.union:UnionRule",
}
_BUILTIN = frozenset(RULES)
_LOADED: dict[str, type[Rule]] = {}


@dataclass(frozen=True)
class Param:
    """A rule's parameter: a number in [low, high], or one of ``choices`` (strings)."""

    name: str
    help: str
    default: float | str | None = None
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] = ()
    option: str | None = None   # a command-line option of its own (e.g. "--power"); else --param NAME=VALUE

    @property
    def flag(self) -> str:
        """How a command line gives it: its own option, or ``--param NAME=VALUE``."""
        return self.option or f"--param {self.name}=VALUE"

    def check(self, value, rule: str):
        if self.choices:
            if value not in self.choices:
                raise ArfuseError(f"{rule} rule: {self.name} {value!r}: use one of {', '.join(self.choices)} "
                                  f"({self.help})")
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ArfuseError(f"{rule} rule: {self.name} {value!r} is not a number ({self.help})") from None
        if not self.low <= v <= self.high or math.isnan(v):
            raise ArfuseError(f"{rule} rule: {self.name} = {value} is outside [{self.low:g}, {self.high:g}] "
                              f"({self.help})")
        return v


class Fit(NamedTuple):
    """A rule with its missing parameters found on data, and how they were found."""

    rule: Rule
    how: str          # e.g. "exact NLL-optimal power": the search, for the report's source text
    exact: bool       # the global optimum of a convex objective (not a bounded approximate search)


class Rule(ABC):
    """A fusion rule: validated parameters, what it needs, and ``rule(logps) -> fused logps``.

    ``logps`` are K log-probability arrays or tensors (the LLM first) of one shape, the vocabulary
    on the last axis for rules that need full distributions; inputs are never modified.
    """

    name: ClassVar[str]
    paper: ClassVar[str]                      # where the rule comes from
    summary: ClassVar[str]                    # one line for --help and error messages
    same_vocab: ClassVar[bool] = True         # fuses token by token: every model needs one tokenizer
    inputs: ClassVar[str] = "full"            # "full": whole distributions; "target": log p(target) suffices
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    weighted: ClassVar[bool] = True           # takes one mixture weight per model (the LLM first)
    params: ClassVar[tuple[Param, ...]] = ()
    # reads what the vocabulary's entries are (token embeddings, token strings): it fuses next-token
    # distributions only, never distributions over answers or classes
    over_tokens: ClassVar[bool] = False
    # models (by index) the rule reads only through their argmax token, which cached records hold
    # (top-1): scoring a text needs no full-distribution pass of theirs
    argmax_only: ClassVar[tuple[int, ...]] = ()

    def __init__(self, weights: Sequence[float] | None = None, **params):
        self.values = {p.name: None if p.default is None else p.check(p.default, self.name) for p in self.params}
        self.weights = None
        self._set(weights, params)

    def _set(self, weights: Sequence[float] | None, params: dict) -> None:
        """Check and take these weights and parameters (None values leave theirs as they are)."""
        unknown = set(params) - {p.name for p in self.params}
        if unknown:
            names = ", ".join(p.name for p in self.params) or "none"
            raise ArfuseError(f"the {self.name} rule has no parameter {', '.join(sorted(unknown))} (its parameters: "
                              f"{names})")
        for p in self.params:
            if params.get(p.name) is not None:
                self.values[p.name] = p.check(params[p.name], self.name)
        if weights is not None and not self.weighted:
            raise ArfuseError(f"the {self.name} rule takes no weights ({self.summary})")
        if weights is not None:
            self.weights = check_weights(weights, len(weights))

    def check_models(self, n: int) -> Rule:
        """Check the number of models (and of weights) alone: for fusing distributions that are not
        over tokens (a multiple-choice task's answers), where the tokenizers do not matter."""
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            lo, hi = self.min_models, self.max_models
            want = ("one large and one small model" if lo == hi == 2 else f"exactly {lo} models" if lo == hi
                    else f"at least {lo}" + ("" if hi is None else f" and at most {hi}") + " models")
            raise ArfuseError(f"the {self.name} rule fuses {want}, {n} given")
        if self.weighted and self.weights is not None and len(self.weights) != n:
            raise ArfuseError(f"{len(self.weights)} weights given for {n} models: give one weight per model, the LLM first")
        return self

    def bind(self, models: Sequence) -> Rule:
        """Check ``models`` (loaded, the LLM first) against what the rule needs; rules that read
        something of the models (token embeddings) take it here. Returns the rule."""
        self.check_models(len(models))
        if self.same_vocab:
            check_same_vocab(models, self.name)
        return self

    def replace(self, weights: Sequence[float] | None = None, **params) -> Rule:
        """A copy with these weights and parameters (checked); whatever ``bind`` took is kept."""
        new = copy.copy(self)
        new.values = dict(self.values)
        new._set(weights, params)
        return new

    def flags(self, names: Sequence[str]) -> str:
        """How a command line gives these values ("weights" or parameter names): "--weight, --power"."""
        by_name = {p.name: p.flag for p in self.params}
        return ", ".join("--weight" if n == "weights" else by_name[n] for n in names)

    def given(self) -> str:
        """Where the values a search would find came from when none was searched: "given (--power)"."""
        names = (["weights"] if self.weighted else []) + [p.name for p in self.params if p.default is None]
        return f"given ({self.flags(names).replace('=VALUE', '')})" if names else "the rule's defaults"

    def settings(self) -> dict:
        """Its parameters that are set, and its weights (a weighted rule): for a report."""
        out = {k: v for k, v in self.values.items() if v is not None}
        return {**out, "weights": self.weights} if self.weighted else out

    def missing(self) -> list[str]:
        """Parameters (and the weights) still unset: what a search must find or the user must give."""
        out = [p.name for p in self.params if self.values.get(p.name) is None]
        return (["weights"] if self.weighted and self.weights is None else []) + out

    @abstractmethod
    def __call__(self, logps: Sequence):
        """Fused log-probs from the models' log-probs (the LLM first)."""

    def target_logprobs(self, logps: Sequence, targets):
        """log P(target) of the fused model, float64 (n,): ``logps`` are the models' log-prob tensors
        (n, V), the LLM first (for a model in ``argmax_only``: its argmax ids (n,)), ``targets`` (n,)."""
        fused = self(logps)
        return fused.gather(-1, targets.long()[:, None])[:, 0].double()

    def check_fit(self, n_models: int) -> None:
        """Fail now, before any data is read, when ``fit`` cannot find what is missing."""
        missing = self.missing()
        if missing and (missing != ["weights"] or n_models != 2):
            what = [m for m in missing if m != "weights"]
            raise ArfuseError(f"the {self.name} rule needs {', '.join(what) or 'weights'}: give "
                              + (self.flags(what) if what else "one weight per model (--weights), the LLM first")
                              + "; arfuse searches only the weight w of two models")

    def fit(self, logps: Sequence, targets, *, chunk: int = 256) -> Fit:
        """The rule with its missing parameters set to minimise the mean NLL of ``targets`` (inputs as
        for ``target_logprobs``). The generic search finds the weight w of two models (w, 1 - w):
        a golden-section search on [0, 1] (to 1e-6), kept only if it beats both ends; rules with a
        search of their own (an exact one) override this."""
        if not self.missing():
            return Fit(self, "given", exact=True)
        self.check_fit(len(logps))

        def nll(w: float) -> float:
            r = self.replace(weights=[w, 1.0 - w])
            return -sum(float(r.target_logprobs([x[i:i + chunk] for x in logps], targets[i:i + chunk]).sum())
                        for i in range(0, len(targets), chunk))

        w = golden_section(nll, 0.0, 1.0, tol=1e-6)
        best = min((nll(x), x) for x in (w, 0.0, 1.0))[1]
        return Fit(self.replace(weights=[best, 1.0 - best]),
                   "NLL-optimal w (golden-section search on [0, 1], to 1e-6)", exact=False)

    def label(self) -> str:
        """A short name for a report's row, e.g. "product rule (w = 0.8123)"."""
        parts = []
        if self.weights is not None:
            parts.append(f"w = {self.weights[0]:.4g}" if len(self.weights) == 2
                         else "weights " + ", ".join(f"{w:.3g}" for w in self.weights))
        parts += [f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.values.items()
                  if v is not None]
        return f"{self.name} rule" + (f" ({', '.join(parts)})" if parts else "")

    def describe(self) -> str:
        parts = [self.name]
        if self.weights is not None:
            parts.append("weights " + ", ".join(f"{w:.4g}" for w in self.weights) + " (LLM first)")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.values.items() if v is not None]
        return ", ".join(parts)


def golden_section(f: Callable[[float], float], lo: float, hi: float, *, tol: float = 1e-6) -> float:
    """The minimiser of ``f`` on [lo, hi] to ``tol`` (exact for a unimodal ``f``, e.g. a convex NLL)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def check_weights(weights: Sequence[float], n_models: int) -> list[float]:
    """Validated mixture weights: one per model, each in [0, 1], summing to 1."""
    ws = [float(w) for w in weights]
    if len(ws) != n_models:
        raise ArfuseError(f"{len(ws)} weights given for {n_models} models: give one weight per model")
    for w in ws:
        if not (0.0 <= w <= 1.0) or math.isnan(w):
            raise ArfuseError(f"weight {w} is outside [0, 1]: the LLM's weight w must satisfy 0 <= w <= 1 "
                              "(for a weight ratio k use w = k / (1 + k))")
    if abs(sum(ws) - 1.0) > 1e-6:
        raise ArfuseError(f"weights {ws} sum to {sum(ws):.6g}, not 1: mixture weights must sum to 1")
    return ws


def resolve_weights(weight: float | None, weights: Sequence[float] | str | None, n_models: int) -> list[float] | None:
    """One weight list from the user's ``--weight w`` (two models) or ``--weights w1,w2,...``
    (the LLM first), validated; None when neither is given (search, or the rule's default)."""
    if weight is not None and weights is not None:
        raise ArfuseError("give either --weight (two models) or --weights (one per model), not both")
    if weight is not None:
        if n_models != 2:
            raise ArfuseError(f"--weight is for two models but {n_models} were given: use --weights w1,w2,... "
                              "(the LLM first)")
        w = float(weight)
        if not 0.0 <= w <= 1.0 or math.isnan(w):
            raise ArfuseError(f"--weight {weight} is outside [0, 1]: give the LLM's weight w, e.g. 0.95 "
                              "(a weight ratio k corresponds to w = k / (1 + k))")
        return [w, 1.0 - w]
    if weights is None:
        return None
    if isinstance(weights, str):
        try:
            weights = [float(x) for x in weights.split(",")]
        except ValueError:
            raise ArfuseError(f"--weights {weights!r}: give comma-separated numbers, e.g. 0.9,0.05,0.05") from None
    return check_weights(weights, n_models)


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Make ``cls`` a rule of every command, under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"{cls!r} is not a subclass of arfuse.fusion.Rule")
    for attr in ("name", "paper", "summary"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"rule class {cls.__name__} needs a string class attribute {attr!r}")
    _LOADED[cls.name] = cls
    RULES.setdefault(cls.name, f"{cls.__module__}:{cls.__qualname__}")
    return cls


def unregister_rule(name: str) -> None:
    """Forget a rule registered with ``register_rule`` (tests, plugins); built-in rules stay."""
    cls = _LOADED.get(name)
    if cls is not None and RULES.get(name) == f"{cls.__module__}:{cls.__qualname__}" and name not in _BUILTIN:
        del RULES[name]
        del _LOADED[name]


PLUGIN_GROUP = "arfuse.rules"
_plugins_read = False


def _read_plugins() -> None:
    """Rules that installed packages declare, once per process: an entry point in the group
    ``arfuse.rules`` (``[project.entry-points."arfuse.rules"] product = "my_rules:ProductRule"`` in
    the package's pyproject.toml) is a rule of every command, the arfuse CLI's included."""
    global _plugins_read
    if _plugins_read:
        return
    _plugins_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        RULES.setdefault(ep.name, ep.value)


def available_rules() -> list[str]:
    """Names of every registered rule, built-in first, then plugins and rules registered in code."""
    _read_plugins()
    return list(RULES)


def get_rule(name: str) -> type[Rule]:
    """The rule class registered as ``name``; an unknown name fails with the choices."""
    if name in _LOADED:
        return _LOADED[name]
    _read_plugins()
    if name not in RULES:
        raise ArfuseError(f"unknown fusion rule {name!r}: use one of {', '.join(RULES)}.{did_you_mean(name, RULES)}")
    module, _, attr = RULES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    _LOADED[name] = cls
    return cls


def make_rule(name: str, weights: Sequence[float] | None = None, **params) -> Rule:
    """An instance of rule ``name`` with its parameters checked (None values left unset)."""
    return get_rule(name)(weights, **{k: v for k, v in params.items() if v is not None})


def cross_tokenizer_hint() -> str:
    """What to do with models whose tokenizers differ, from the rules registered now."""
    any_vocab = [n for n in RULES if not get_rule(n).same_vocab]
    if any_vocab:
        return "models with different tokenizers need a rule that aligns them: " + ", ".join(
            f"--rule {n}" for n in any_vocab)
    return ("every registered rule (" + ", ".join(RULES) + ") fuses token by token and needs one tokenizer: "
            "fuse models that share it, or compare the models in bits per byte (`arfuse score`)")


def check_same_vocab(models: Sequence, rule: str = "linear") -> None:
    """Every model has the LLM's vocabulary and tokenizer (``models``: loaded adapters, the LLM first)."""
    big = models[0]
    for m in models[1:]:
        if m.info.vocab_size != big.info.vocab_size:
            why = f"vocabularies differ ({big.info.vocab_size:,} tokens in {big.info.name} vs {m.info.vocab_size:,} in {m.info.name})"
        elif m.tokenizer_fingerprint() != big.tokenizer_fingerprint():
            why = (f"{big.info.name} and {m.info.name} have vocabularies of the same size ({m.info.vocab_size:,}) but "
                   "different tokenizers")
        else:
            continue
        raise ArfuseError(f"{why}: the {rule} rule needs one tokenizer; {cross_tokenizer_hint()}")
