"""``EvalConfig``: one evaluation of a large model fused with small ones, for every head
(causal LMs, image classifiers, masked LMs), validated when it is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from arfuse.data.fasta import MaskConfig
from arfuse.errors import ArfuseError
from arfuse.fusion.registry import check_weights, get_rule, make_rule
from arfuse.scoring.scorer import ScoreConfig

OBJECTIVES = ("nll", "accuracy")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EvalConfig:
    """What to fuse, on which data, and how; every head reads the fields it needs."""

    large: str
    smalls: list[str]
    data: str                                   # reported on
    valid: str | None = None                    # the weight is chosen here (else on ``data``, said to be optimistic)
    weights: list[float] | None = None          # one per model, the LLM first; None: searched
    rule: str = "linear"                        # a registered fusion rule (arfuse.fusion.registry)
    rule_params: dict = field(default_factory=dict)
    score: ScoreConfig = field(default_factory=ScoreConfig)   # causal LMs: windows, BOS, top-k
    mask: MaskConfig = field(default_factory=MaskConfig)      # masked LMs: which residues are masked
    objective: str | None = None                # classifiers: "accuracy" (two models' default) or "nll"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 4
    use_cache: bool = True
    bootstrap: int = 10000                      # classifiers: paired-bootstrap resamples (0: none)
    curve_points: int = 200                     # points of the gain curve against k

    def __post_init__(self):
        smalls = [self.smalls] if isinstance(self.smalls, str) else list(self.smalls)
        if not smalls:
            raise ArfuseError("no small model given: fuse the large model with at least one small one (--small)")
        object.__setattr__(self, "smalls", smalls)
        for name in ("large", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ArfuseError(f"{name} {getattr(self, name)!r}: give a model or data name, or a path")
        n = 1 + len(smalls)
        if self.weights is not None:
            object.__setattr__(self, "weights", check_weights(self.weights, n))
        object.__setattr__(self, "rule_params", dict(self.rule_params or {}))
        self._check_rule(n)
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ArfuseError(f"objective {self.objective!r}: use one of {', '.join(OBJECTIVES)} (or None for the "
                              "head's default)")
        if self.objective is not None and self.weights is not None:
            raise ArfuseError(f"objective {self.objective!r} and given weights contradict: give one or the other")
        if self.objective == "accuracy" and n != 2:
            raise ArfuseError(f"the exact accuracy search is for two models, but {n} were given: "
                              "use objective 'nll' (EM on the simplex) for K models")
        if self.dtype not in DTYPES:
            raise ArfuseError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        for name, low in (("batch_size", 1), ("bootstrap", 0), ("curve_points", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ArfuseError(f"{name} {v!r} must be an integer >= {low}")

    def _check_rule(self, n: int) -> None:
        """The rule exists, its parameters are its own and in range, and it fuses ``n`` models."""
        cls = get_rule(self.rule)  # an unknown name fails with the registered choices
        rule = make_rule(self.rule, self.weights if cls.weighted else None, **self.rule_params)
        rule.check_models(n)

    def to_dict(self) -> dict:
        return asdict(self)
