"""Weight search and AR-law analysis over cached records only."""
from arfuse.search.weights import (
    OptimumResult, gain_curve, improvement_domain, mixture_nll, optimal_weight, optimal_weights_em,
)

__all__ = ["OptimumResult", "gain_curve", "improvement_domain", "mixture_nll", "optimal_weight", "optimal_weights_em"]
