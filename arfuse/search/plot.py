"""The plot of a fused model's gain against the weight ratio k (every evaluation head draws it)."""
from __future__ import annotations

import math
from collections.abc import Sequence


def plot_gain_curve(path: str, ks: Sequence[float], gains: Sequence[float], *, label: str, ylabel: str, title: str,
                    domain_k_min: float | None = None, k_star: float | None = None, k_star_label: str = "k*",
                    used_k: float | None = None, used_gain: float | None = None) -> str:
    """Gain against k on a log axis: the improvement domain (k_min, inf) shaded, k* and the used k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ks, gains, color="C0", lw=2, label=label)
    if domain_k_min is not None and math.isfinite(domain_k_min):
        ax.axvspan(max(domain_k_min, ks[0]), ks[-1], color="C2", alpha=0.12,
                   label=f"improvement domain k > {domain_k_min:.3g}")
    if k_star is not None and 0 < k_star < math.inf:
        ax.axvline(k_star, color="C3", ls="--", lw=1, label=f"{k_star_label} = {k_star:.3g}")
    if used_k is not None and 0 < used_k < math.inf and used_gain is not None:
        ax.plot([used_k], [used_gain], "o", color="C1", label=f"used k = {used_k:.3g} ({used_gain:+.2f})")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("weight ratio k = w / (1 - w)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
