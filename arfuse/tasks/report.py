"""``EvalReport``: what every evaluation head reports, one type with one JSON form, one text
form and one plot. A field a head has nothing for is None (null in JSON), so every report has
the same keys."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.formatting import fmt_k, json_safe, render_table
from arfuse.fusion import w_to_k


@dataclass
class Row:
    """One model alone, an average or a fused model, with its gain over the LLM alone."""

    name: str
    kind: str                       # "large", "small", "uniform", "fused", "rule"
    metrics: dict                   # the head's numbers (perplexities; top-1 and NLL; masked PPL, CE, top-1)
    gain_pct: float | None          # gain over the LLM in % of the head's perplexity (causal and masked LMs)
    weights: list[float] | None = None
    gain_pp: float | None = None    # top-1 gain over the LLM in percentage points (classifiers)

    @property
    def gain(self) -> float:
        return self.gain_pct if self.gain_pct is not None else self.gain_pp


@dataclass
class EvalReport:
    head: str                       # "causal", "image" or "masked" (arfuse.tasks.heads)
    models: list[dict]
    data: dict
    valid: dict | None
    windowing: str                  # how the data became scored units: windows, images, masked residues
    weights: list[float]
    k: float | None                 # w / (1 - w) for two models
    weight_source: str
    search: str                     # how the weights came: "given", "nll" or "accuracy"
    param_ratio: list[float]
    rows: list[Row]
    gain_of: str                    # what the rows' gain compares, e.g. "token perplexity"
    config: dict = field(default_factory=dict)
    bos: list[bool] | None = None               # causal LMs: BOS per model
    masked_positions: int | None = None         # masked LMs
    # two models, on the reported data: the NLL optimum, the improvement domain, the gain against k
    domain_w: tuple[float, float] | None = None
    domain_k: tuple[float, float] | None = None
    k_star: float | None = None
    optimum_iterations: int | None = None
    curve: dict | None = None       # {"k", "gain_pct"} (perplexities) or {"edges", "gain_pp"} (an exact step curve)
    gain_ci: dict | None = None     # block-bootstrap interval of the fused row's perplexity gain (causal LMs)
    # classifiers, two models: the NLL optimum, the exact accuracy curve, the three sets, the bootstrap
    nll_optimum: dict | None = None
    accuracy_curve: dict | None = None
    sets: dict | None = None
    bootstrap: dict | None = None
    rule: dict | None = None        # a non-linear rule's row: name, params, source (where they came from), gain_ci
    notes: list[str] = field(default_factory=list)

    @property
    def fused(self) -> Row:
        return next(r for r in self.rows if r.kind == "fused")

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_markdown(self) -> str:
        """The report as text: a header, a Markdown table of every row, then what was chosen and found."""
        from arfuse.tasks.heads import describe

        return describe(self)

    def plot(self, path: str) -> str:
        """The gain over the LLM against k, the improvement domain shaded, k* and the used k marked."""
        from arfuse.search.plot import plot_gain_curve

        if self.curve is None:
            why = (f"it exists for two models (a large and one small), {len(self.models)} were fused"
                   if len(self.models) != 2 else "the improvement domain is empty (the small model never helps)")
            raise ArfuseError(f"no gain curve to plot: {why}")
        unit = "pp" if self.fused.gain_pp is not None else "%"
        if "edges" in self.curve:  # an exact step curve: one gain per segment between thresholds
            ks, gains = _steps(self.curve["edges"], self.curve["gain_pp"])
        else:
            ks, gains = self.curve["k"], self.curve["gain_pct"]
        acc_domain = (self.accuracy_curve or {}).get("domain")
        k_min = self.domain_k[0] if self.domain_k else (acc_domain["k_min"] if acc_domain else None)
        k_star = self.k_star if self.k_star is not None else (self.nll_optimum or {}).get("k")
        names = [m["name"] for m in self.models]
        return plot_gain_curve(
            path, ks, gains, label=f"fused vs {names[0]} ({self.gain_of})",
            ylabel=f"{self.gain_of} gain over the LLM ({unit})",
            title=f"{names[0]} + {names[1]} on {self.data['name']}\n{self.windowing}", domain_k_min=k_min,
            k_star=k_star, k_star_label="NLL-optimal k*", used_k=self.k, used_gain=self.fused.gain)


def _steps(edges, gain) -> tuple[np.ndarray, np.ndarray]:
    """A step curve's corners on a finite k range around its thresholds."""
    edges = np.asarray(edges, np.float64)
    inner = edges[1:-1]
    lo_k = max(inner.min() / 3, 1e-3) if len(inner) else 1e-2
    hi_k = min(inner.max() * 3, 1e4) if len(inner) else 1e2
    return np.clip(np.repeat(edges, 2)[1:-1], lo_k, hi_k), np.repeat(np.asarray(gain, np.float64), 2)


# ---- text pieces every head's ``describe`` uses --------------------------------------------------
def weight_cells(weights: list[float] | None, *, k_for_any: bool = False) -> list[str]:
    """The w and k cells of a row: the LLM's weight, and k = w / (1 - w) for two models (or for
    any number of models with ``k_for_any``: the LLM's weight against all the others')."""
    if weights is None:
        return ["", ""]
    w = weights[0]
    return [f"{w:.6f}", fmt_k(w_to_k(w)) if k_for_any or len(weights) == 2 else ""]


def table(report: EvalReport, header: list[str], cells) -> str:
    """A Markdown table of the report's rows: ``cells(row, num_parameters or None)`` gives each row's
    middle columns; the model name first and the gain, w and k last."""
    params = {m["name"]: m["num_parameters"] for m in report.models}
    return render_table(header, [[r.name, *cells(r, params.get(r.name))] for r in report.rows])


def gain_cell(row: Row, fmt: str) -> str:
    return "" if row.kind == "large" else format(row.gain, fmt)


def rule_lines(report: EvalReport) -> list[str]:
    """A non-linear rule's parameters, where they came from, and its gain's interval."""
    if not report.rule:
        return []
    r, ci = report.rule, report.rule["gain_ci"]
    params = ", ".join(f"{k} {_value(v)}" for k, v in r["params"].items())
    return [f"{r['name']} rule: {params} ({r['source']})",
            (f"AR {r['name']} vs {report.models[0]['name']}: {ci['gain_pct']:+.3f}% {report.gain_of}, "
             f"{100 * ci['level']:.0f}% interval [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}]%")]


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def weight_lines(report) -> list[str]:
    """The weights, k and parameter ratio, and where the weights came from."""
    ratio = ", ".join(f"{x:.1f}" for x in report.param_ratio)
    return [f"weights: {', '.join(f'{w:.6f}' for w in report.weights)} (LLM first); k = {fmt_k(report.k)}; "
            f"parameter ratio r = {ratio}", f"weight source: {report.weight_source}"]


def domain_lines(report) -> list[str]:
    """The improvement domain of two models on the reported data (none for K models)."""
    name = report.data["name"]
    if report.domain_k:
        return [f"improvement domain on {name}: k > {report.domain_k[0]:.4g} (w > {report.domain_w[0]:.6f}); "
                f"k* = {fmt_k(report.k_star)} there"]
    if len(report.models) == 2:
        return [f"improvement domain on {name}: empty (no weight makes the fused model beat the LLM)"]
    return []


def note_lines(report: EvalReport) -> list[str]:
    return [f"note: {n}" for n in report.notes]
