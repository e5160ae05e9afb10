"""What to generate and how: a validated config that rejects bad values with the fix."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from arfuse.errors import ArfuseError

TRUNCATE = ("error", "left")
DRAFT_HEADS = ("candidates", "full")


@dataclass
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` is greedy decoding of the fused distribution.

    speculative: None plain fused decoding; an int g >= 1 drafts g tokens per large-model pass;
    "auto" picks g from the measured acceptance rate and step times. draft: "slm", the first
    small model drafts step by step; "lookup", drafts are copied from the row's own text where its
    last tokens occurred before, and every model (the SLM too) scores them in one pass; "hybrid":
    each row drafts the copy its own text offers where
    copies of that match length have been accepted at least as often as the SLM's drafts on its text
    so far (both measured at every cycle), and the SLM drafts the other rows; a cycle where every row
    copies is a lookup cycle (lookup and SLM cycles each have their own g when speculative ==
    "auto"). A row's choices depend on its own text only, so with a fixed g its
    tokens are the same alone or in any batch. "auto" (the default): "hybrid" with a small model,
    "lookup" without one.
    draft_head: "candidates", the drafting SLM's output layer scores a few thousand likely tokens
    per draft step and its whole layer runs once per cycle (arfuse.generation.draft_head); "full",
    the whole layer at every draft step. The output is the same either way.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    speculative: int | str | None = None
    max_draft: int = 8                   # upper bound on g when speculative == "auto"
    truncate: str = "error"              # a prompt too long for a model's context: "error" or "left"
    stop_at_eos: bool = True
    bos: str = "auto"
    fast_kernels: bool = True            # 2-8-row products as W @ x.T; repeated head rows once (adapters.kernels)
    draft: str = "auto"                  # who drafts: "slm" (the first small model), "lookup" (the text), "hybrid"
    #                                      (per row, the text's copy or the SLM) or "auto" (hybrid; lookup without an SLM)
    draft_head: str = "candidates"       # the drafting SLM's head while drafting: "candidates" or "full"

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ArfuseError(f"max_new_tokens (--max-new-tokens) {self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ArfuseError(f"temperature (--temperature) {self.temperature} must be >= 0 (0 is greedy decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ArfuseError(f"top_p (--top-p) {self.top_p} must be in (0, 1] (1 keeps the whole distribution)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ArfuseError(f"top_k (--top-k) {self.top_k!r} must be an integer >= 0 (0 keeps every token)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ArfuseError("an empty stop string would stop at once: give non-empty stop strings")
        sp = self.speculative
        if sp is not None and sp != "auto":
            if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
                raise ArfuseError(f"speculative g = {sp!r} must be an integer >= 1 (tokens the small model drafts "
                                  "per large-model pass), 'auto' to choose it from the measured acceptance rate, "
                                  "or None for plain fused decoding")
        from arfuse.generation.drafters import DRAFTERS  # they import this module

        if self.draft != "auto" and self.draft not in DRAFTERS:
            raise ArfuseError(f"draft {self.draft!r}: use " + ", ".join(f"{n!r} ({d.summary})"
                                                                         for n, d in DRAFTERS.items())
                              + " or 'auto' (hybrid, or lookup without a small model)")
        if self.draft_head not in DRAFT_HEADS:
            raise ArfuseError(f"draft_head {self.draft_head!r}: use 'candidates' (the drafting SLM scores a candidate "
                              "set per step, its whole head once per cycle) or 'full' (its whole head every step)")
        if self.draft != "auto" and sp is None:
            raise ArfuseError(f"draft={self.draft!r} is a way of speculating: give speculative g (or 'auto') too")
        if not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise ArfuseError(f"max_draft {self.max_draft!r} must be an integer >= 1")
        if self.truncate not in TRUNCATE:
            raise ArfuseError(f"truncate {self.truncate!r}: use 'error' (refuse a prompt longer than the context) "
                              "or 'left' (drop its oldest tokens)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


STRATEGIES = ("token", "segment")
SCORERS = ("logprob", "byte", "logit")
EXITS = ("draft", "all")


@dataclass
class SegmentOptions:
    """Segment-level ensembling (SpecFuse, ``arfuse.generation.segment``), validated.

    segment_len: tokens each model drafts per round at most (the draft is then cut at a word end).
    scorer: a candidate's score by one model, the mean over that model's tokens of the candidate
    of their log-probability ("logprob"), its log-probability per byte of the candidate ("byte": one
    unit whatever the tokenizer) or the mean raw logit ("logit", the released code's choice).
    hedge_rate: eta of the Hedge weights, w_m proportional to exp(-eta * rounds model m's candidate lost).
    patience: a model whose candidates lose this many rounds in a row exits (None: no exit);
    exit: it then stops drafting but still verifies ("draft") or leaves entirely ("all").
    """

    segment_len: int = 10
    scorer: str = "logprob"
    hedge_rate: float = 0.5
    patience: int | None = None
    exit: str = "draft"

    def __post_init__(self):
        L = self.segment_len
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ArfuseError(f"segment length {L!r} must be an integer >= 1 (tokens each model drafts per round, "
                              "--segment-len; 10 is the paper's)")
        if self.scorer not in SCORERS:
            raise ArfuseError(f"scorer {self.scorer!r}: use 'logprob' (mean token log-probability of a candidate), "
                              "'byte' (its log-probability per byte: comparable across tokenizers) or 'logit' "
                              "(mean raw logit, the released SpecFuse code's choice)")
        eta = self.hedge_rate
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 < eta < math.inf):
            raise ArfuseError(f"Hedge rate {eta!r} must be a positive number (--hedge-rate, e.g. 0.5): a model's "
                              "weight is proportional to exp(-rate * rounds its candidate lost)")
        p = self.patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ArfuseError(f"patience {p!r} must be an integer >= 1 (rounds lost in a row before a model exits, "
                              "--patience) or None for no exit")
        if self.exit not in EXITS:
            raise ArfuseError(f"exit {self.exit!r}: use 'draft' (a model that keeps losing stops drafting but still "
                              "verifies) or 'all' (it leaves the ensemble)")

    def check_models(self, n_models: int) -> None:
        """Model exit needs another model to carry on."""
        if self.patience is not None and n_models < 2:
            raise ArfuseError(f"model exit (patience {self.patience}) needs at least two models: a single model would "
                              "exit from itself; give --small, or drop --patience")
