"""Fusion rules as decoding sees them: one call from the models' log-probs to the fused log-probs."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from arfuse.errors import ArfuseError
from arfuse.fusion import check_weights, linear
from arfuse.fusion.cosine import check_power, cosine, unit_rows

RULES = ("linear", "cosine")


class LinearRule:
    """P = sum_i w_i p_i (the AR mixture), the LLM first."""

    def __init__(self, weights: Sequence[float]):
        self.weights = check_weights(weights, len(weights))

    def __call__(self, logps: Sequence[torch.Tensor]) -> torch.Tensor:
        return linear(logps, self.weights)

    def describe(self) -> str:
        return "linear, weights " + ", ".join(f"{w:.4g}" for w in self.weights) + " (LLM first)"


class CosineRule:
    """P ∝ p_LLM * s(v, argmax p_SLM)^power on one model's token embeddings (see arfuse.fusion.cosine)."""

    def __init__(self, power: float, embeddings: torch.Tensor):
        self.power = check_power(power)
        self.unit = unit_rows(embeddings)

    def __call__(self, logps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(logps) != 2:
            raise ArfuseError(f"the cosine rule fuses exactly two models, {len(logps)} given: "
                              "use the linear rule for several small models")
        return cosine(logps[0], logps[1], self.unit, self.power)

    def describe(self) -> str:
        return f"cosine, power {self.power:.4g}"


def input_embeddings(model) -> torch.Tensor:
    """The (V, D) token-embedding matrix of a loaded model, for the cosine rule."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_input_embeddings"):
        return inner.get_input_embeddings().weight.detach()
    if inner is not None and hasattr(inner, "tok_embeddings"):  # llama2.c
        return inner.tok_embeddings.weight.detach()
    raise ArfuseError(f"cannot find the token embeddings of {model.info.name}: the cosine rule needs them; "
                      "use --rule linear")
