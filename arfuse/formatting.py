"""Formatting shared by every report: JSON-safe values, the weight ratio k, Markdown tables."""
from __future__ import annotations

import math


def json_safe(x):
    """``x`` with NaN as None, infinities as "inf" and NumPy scalars as Python numbers, recursively."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():  # a NumPy or PyTorch scalar
        return json_safe(x.item())
    return x


def fmt_k(k) -> str:
    """A weight ratio (or any number) in four significant digits: "inf", "-" for None or NaN."""
    if k is None or k == "inf":
        return "-" if k is None else "inf"
    k = float(k)
    if math.isnan(k):
        return "-"
    return "inf" if math.isinf(k) else f"{k:.4g}"


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns (readable in a terminal and on GitHub)."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
