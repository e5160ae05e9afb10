"""Who drafts a speculative cycle: the small model ("slm"), copies from each row's own text
("lookup"), or per row whichever has done better on its text so far ("hybrid").

A drafter ``propose``s each cycle's plan (which kind of cycle runs, and each row's copy) and
``observe``s how the cycle went at its first position; the decoding loop runs the same way
whichever drafter it holds. A row's plan depends on its own text only, so with a fixed g its tokens
are the same alone or in any batch.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from arfuse.generation.config import GenerationConfig
from arfuse.generation.draft_length import DraftSources
from arfuse.generation.results import Row
from arfuse.generation.sampling import transform
from arfuse.generation.speculative import lookup_match


@dataclass
class Plan:
    """A speculative cycle's plan: ``kind`` "slm" (the SLM drafts; rows with a copy draft it) or
    "lookup" (every row drafts its copy, every model verifies in one pass); ``copies``, per row, the
    copy it drafts ([] where the SLM drafts or nothing matched; None: no row looked); ``seconds``
    spent finding them (drafting time)."""

    kind: str
    copies: list[list[int]] | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """The kind as statistics count it: "slm+copies" where SLM drafts and copies share the cycle."""
        return "slm+copies" if self.kind == "slm" and self.copies is not None and any(self.copies) else self.kind


class Drafter:
    """The interface: ``propose`` before a cycle, ``observe`` after it."""

    name = ""
    summary = ""         # one line for --help and error messages
    uses_slm = False     # drafts with the first small model (its draft head may be restricted)

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg

    def propose(self, rows: Sequence[Row], cap: int) -> Plan:
        """The plan of the next cycle for the active ``rows``; copies at most ``cap`` tokens long."""
        raise NotImplementedError

    def observe(self, rows: Sequence[Row], first: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """After a cycle (plain or speculative) of ``rows``: P and the SLM's log-probs (B, V) at its
        first position."""


class SLMDrafter(Drafter):
    """The first small model drafts every row, step by step."""

    name, uses_slm = "slm", True
    summary = "the small model drafts"

    def propose(self, rows: Sequence[Row], cap: int) -> Plan:
        return Plan("slm")


def _copies(rows: Sequence[Row], cap: int) -> tuple[list[tuple[list[int], int]], float]:
    """Each row's copy from its own text (prompt and output) and its match length, as long as any g
    may use (cut to g later); and the seconds it took."""
    t0 = time.perf_counter()
    found = [lookup_match(r.context + r.ids, cap) for r in rows]
    return found, time.perf_counter() - t0


class LookupDrafter(Drafter):
    """Drafts copied from each row's own text where its last tokens occurred before (prompt-lookup
    decoding); every model, the SLM too, scores them in one pass."""

    name = "lookup"
    summary = "drafts copied from the text so far; every model verifies them in one pass"

    def propose(self, rows: Sequence[Row], cap: int) -> Plan:
        found, seconds = _copies(rows, cap)
        return Plan("lookup", [c for c, _ in found], seconds)


class HybridDrafter(Drafter):
    """Per row, the copy its text offers where copies of that match length have done at least as well
    as the SLM's drafts on its text so far (``DraftSources``, both measured at every cycle), else the
    SLM. A cycle where every row copies is a lookup cycle (one pass of every model)."""

    name, uses_slm = "hybrid", True
    summary = ("per prompt, the text's copy where copies have done at least as well as the small model, the "
               "small model otherwise")

    def __init__(self, cfg: GenerationConfig):
        super().__init__(cfg)
        self.sources: dict[int, DraftSources] = {}   # prompt index -> its record
        self._found: list[tuple[list[int], int]] = []

    def _record(self, row: Row) -> DraftSources:
        return self.sources.setdefault(row.index, DraftSources())

    def propose(self, rows: Sequence[Row], cap: int) -> Plan:
        found, seconds = _copies(rows, cap)
        self._found = found
        copies = [c if self._record(r).prefers_copy(n) else [] for r, (c, n) in zip(rows, found)]
        return Plan("lookup" if all(copies) else "slm", copies, seconds)

    def observe(self, rows: Sequence[Row], first: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Would the SLM's first draft and the copy (by its match length) have been accepted at this
        cycle's first position? Greedy: is it P's argmax; sampling: the chance that it is accepted,
        sum_v min(P, q) for the SLM, P(d) for a copy."""
        logp, logq = first  # (B, V) each
        if logq is None:
            return
        c = self.cfg
        if c.greedy:
            best = logp.argmax(-1)
            slm = (logq.argmax(-1) == best).double()
            copy_of = lambda b, d: float(d == int(best[b]))  # noqa: E731
        else:
            p = logp.double().exp()
            slm = torch.minimum(p, transform(logq, c.temperature, c.top_k, c.top_p).double().exp()).sum(-1)
            copy_of = lambda b, d: float(p[b, d])  # noqa: E731
        for b, (row, (copy, n)) in enumerate(zip(rows, self._found)):
            record = self._record(row)
            record.update("slm", float(slm[b]))
            if copy:
                record.update(n, copy_of(b, copy[0]))


# who drafts, by name: a new drafter is one class with propose/observe and one line here
DRAFTERS: dict[str, type[Drafter]] = {"hybrid": HybridDrafter, "slm": SLMDrafter, "lookup": LookupDrafter}


def make_drafter(name: str, cfg: GenerationConfig) -> Drafter:
    """The drafter called ``name`` (a key of ``DRAFTERS``; the config has checked it)."""
    return DRAFTERS[name](cfg)
