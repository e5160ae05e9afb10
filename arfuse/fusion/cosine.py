"""The cosine-similarity AR variant (the AR paper, Appendix B.3).

The LLM's distribution is reweighted by how similar each token is to the SLM's top choice:

    P(v) ∝ p_LLM(v) * s(v, a)^p,      a = argmax p_SLM,      s = (1 + cos(e_v, e_a)) / 2

with e the rows of a token-embedding matrix (the LLM's input embeddings by default) and p >= 0
the power that carries the relative-overfitting information, searched like the weight w of the
linear rule (p = 0 is the LLM alone). The paper raises the cosine itself to the power p; a
cosine can be negative, so arfuse maps it to [0, 1] first, which keeps every token possible and
the fused log-likelihood finite. Similarities are computed on demand, one row per SLM argmax
(V dot products), never as a V x V matrix.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Fit, Param, Rule


def check_power(power: float) -> float:
    p = float(power)
    if not p >= 0.0 or p == float("inf"):
        raise ArfuseError(f"power {power} must be a finite number >= 0: p = 0 is the LLM alone, larger p "
                          "pulls the LLM harder towards tokens similar to the SLM's top choice")
    return p


def unit_rows(emb) -> torch.Tensor:
    """The embedding matrix (V, D) with each row scaled to unit length (float32), computed once per model."""
    e = torch.as_tensor(emb).float()
    return e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def log_similarity(unit_emb: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """log s(v, a) for every token v against each anchor token a: anchor (...,) -> (..., V)."""
    cos = unit_emb[anchor.to(unit_emb.device)] @ unit_emb.T  # (..., V)
    return torch.log(((1.0 + cos) * 0.5).clamp(min=0.0))


def _to_torch(x):
    return (torch.from_numpy(np.asarray(x)), True) if not isinstance(x, torch.Tensor) else (x, False)


def cosine(logp_llm, logp_slm, unit_emb: torch.Tensor, power: float):
    """Fused log-probs (..., V) of the cosine rule from the LLM's and SLM's log-probs (..., V)."""
    p = check_power(power)
    ll, was_np = _to_torch(logp_llm)
    ls, _ = _to_torch(logp_slm)
    if ll.shape != ls.shape:
        raise ArfuseError(f"log-prob shapes differ ({tuple(ll.shape)} vs {tuple(ls.shape)}): the cosine rule needs "
                          "two models with one vocabulary")
    if p == 0.0:
        out = ll.clone()
    else:
        logs = log_similarity(unit_emb, ls.argmax(-1)).to(ll.device, ll.dtype)
        out = torch.log_softmax(ll + p * logs, dim=-1)
    return out.numpy() if was_np else out


def cosine_target_logprobs(logp_llm: torch.Tensor, slm_argmax: torch.Tensor, targets: torch.Tensor,
                           unit_emb: torch.Tensor, powers) -> torch.Tensor:
    """log P_p(target) of the cosine rule at several powers at once: logp_llm (N, V), slm_argmax and
    targets (N,), powers (P,) -> (N, P). For scoring: the full LLM distribution is needed per
    position (the normaliser sums over the vocabulary), the SLM's argmax only."""
    ps = torch.as_tensor([check_power(p) for p in powers], dtype=torch.float64)  # (P,)
    logs = log_similarity(unit_emb, slm_argmax).double()  # (N, V)
    ll = logp_llm.double()
    z = torch.logsumexp(ll[:, None, :] + ps[None, :, None] * logs[:, None, :], dim=-1)  # (N, P)
    t = targets.long().unsqueeze(-1)
    lt = ll.gather(-1, t) + ps[None, :] * logs.gather(-1, t)  # (N, P)
    return (lt - z).float()


def _nll_grad_hess(ll: torch.Tensor, logs: torch.Tensor, lt_ll: torch.Tensor, lt_s: torch.Tensor, p: float):
    """Mean NLL of the targets at power p and its first two derivatives in p (float64 inputs).

    -log P_p(t) = -log p_L(t) - p log s(t) + log Z(p); d/dp log Z = E_P[log s] and
    d2/dp2 log Z = Var_P[log s] >= 0, so the NLL is convex in p and has one minimum.
    """
    logits = ll + p * logs  # (n, V)
    lz = torch.logsumexp(logits, -1)
    P = torch.exp(logits - lz[:, None])
    ls0 = torch.where(torch.isfinite(logs), logs, torch.zeros_like(logs))  # 0 * -inf would be NaN
    m1 = (P * ls0).sum(-1)
    m2 = (P * ls0 * ls0).sum(-1) - m1 * m1
    return (-(lt_ll + p * lt_s - lz)).sum().item(), (-(lt_s - m1)).sum().item(), m2.sum().item()


def optimal_power(logp_llm: torch.Tensor, slm_argmax: torch.Tensor, targets: torch.Tensor, unit_emb: torch.Tensor,
                  *, p_max: float = 100.0, tol: float = 1e-9, max_iter: int = 100, chunk: int = 256) -> tuple[float, float]:
    """The exact NLL-optimal power p in [0, p_max] of the cosine rule, and the mean NLL there.

    Newton steps on the convex mean NLL, kept inside a bracket that bisection shrinks. Inputs:
    the LLM's full log-probs (N, V), the SLM's argmax and the targets (N,); positions are
    processed ``chunk`` at a time, so memory is the (N, V) input plus O(chunk * V).
    """
    N = logp_llm.shape[0]
    targets = targets.long()

    def total(p: float) -> tuple[float, float, float]:
        f = g = h = 0.0
        for i in range(0, N, chunk):
            ll = logp_llm[i:i + chunk].double()
            logs = log_similarity(unit_emb, slm_argmax[i:i + chunk]).double()
            t = targets[i:i + chunk, None]
            a, b, c = _nll_grad_hess(ll, logs, ll.gather(-1, t)[:, 0], logs.gather(-1, t)[:, 0], p)
            f, g, h = f + a, g + b, h + c
        return f / N, g / N, h / N

    f0, g0, _ = total(0.0)
    if g0 >= 0:  # the NLL rises from p = 0: the SLM cannot help under this rule
        return 0.0, f0
    lo, hi, p = 0.0, p_max, 1.0
    _, ghi, _ = total(hi)
    if ghi <= 0:
        return hi, total(hi)[0]
    for _ in range(max_iter):
        f, g, h = total(p)
        if g > 0:
            hi = p
        else:
            lo = p
        step = p - g / h if h > 0 else (lo + hi) / 2
        p_new = step if lo < step < hi else (lo + hi) / 2
        if abs(p_new - p) < tol * max(1.0, p):
            return p_new, total(p_new)[0]
        p = p_new
    return p, total(p)[0]


class CosineRule(Rule):
    """P ∝ p_LLM(v) s(v, argmax p_SLM)^power, on one model's token embeddings."""

    name = "cosine"
    paper = "the AR paper, Appendix B.3 (the cosine-similarity variant)"
    summary = "P ∝ p_LLM(v) s(v, a)^p with a = argmax p_SLM and s the cosine of token embeddings mapped to [0, 1]"
    min_models = max_models = 2
    weighted = False
    over_tokens = True      # token embeddings: next-token distributions only
    argmax_only = (1,)      # the SLM enters through its top token alone
    params = (Param("power", "p >= 0: 0 is the LLM alone, larger p pulls harder towards the SLM's top choice",
                    low=0.0, high=math.inf, option="--power"),
              Param("embeddings", "whose token embeddings give the similarity", "large", choices=("large", "small"),
                    option="--embeddings"))

    def bind(self, models):
        super().bind(models)
        self.unit = unit_rows(models[0 if self.values["embeddings"] == "large" else 1].input_embeddings())
        return self

    @property
    def power(self) -> float:
        p = self.values["power"]
        if p is None:
            raise ArfuseError("the cosine rule needs its power p (--power), e.g. 1.0; p = 0 is the LLM alone")
        return check_power(p)

    def __call__(self, logps):
        return cosine(logps[0], logps[1], self.unit, self.power)

    @staticmethod
    def _anchor(x: torch.Tensor) -> torch.Tensor:
        return x.long() if x.dim() == 1 else x.argmax(-1)

    def target_logprobs(self, logps, targets):
        """log P(target) in float64 from the LLM's log-probs (n, V) and the SLM's argmax ids (n,)
        (or its log-probs (n, V)): the normaliser is computed in float64."""
        return cosine_target_logprobs(logps[0], self._anchor(logps[1]), targets, self.unit,
                                      [self.power])[:, 0].double()

    def check_fit(self, n_models: int) -> None:
        pass  # the power is its one parameter without a default, and ``fit`` finds it

    def fit(self, logps, targets, *, chunk: int = 256) -> Fit:
        """The exact NLL-optimal power (``optimal_power``: Newton on the convex NLL)."""
        if self.values["power"] is not None:
            return Fit(self, "given", exact=True)
        p, _ = optimal_power(logps[0], self._anchor(logps[1]), targets.long(), self.unit, chunk=chunk)
        return Fit(self.replace(power=p), "exact NLL-optimal power", exact=True)

    def label(self) -> str:
        return f"AR cosine (p = {self.power:.4g})"

    def describe(self) -> str:
        return f"cosine, power {self.power:.4g}"
