"""A toy fusion rule for the tests, written as a user would: one class, registered in one line
(``register_rule(ProductRule)``, in the tests that use it)."""
from arfuse.errors import ArfuseError
from arfuse.fusion.linear import logprob_average
from arfuse.fusion.registry import Rule


class ProductRule(Rule):
    """A log-linear product of experts: P ∝ p_LLM^w p_SLM^(1 - w)."""

    name = "product"
    paper = "Hinton, Training products of experts by minimizing contrastive divergence (2002)"
    summary = "P ∝ p_LLM^w p_SLM^(1 - w), a log-linear product of experts"
    min_models = max_models = 2

    def __call__(self, logps):
        if self.weights is None:
            raise ArfuseError("the product rule needs its weight w (--weight)")
        return logprob_average(logps, self.weights)
