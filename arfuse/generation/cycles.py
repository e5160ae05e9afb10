"""One decoding cycle over every model's state: a plain fused step, a cycle drafted by the small
model (rows with a copy from their own text draft that copy instead), or a cycle whose drafts are
all copies (lookup). Each commits 1 or more tokens per row and leaves every model having seen all
committed tokens but the last one.

Speculative cycles verify their drafts against the fused target P (see ``speculative.py``): the
tokens that come out follow P exactly, whatever drafted them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from arfuse.generation.config import GenerationConfig
from arfuse.generation.draft_head import DraftHead
from arfuse.generation.results import GenerationStats
from arfuse.generation.sampling import residual, sample, transform
from arfuse.generation.speculative import accepted_counts
from arfuse.generation.state import ModelState, feed_all

Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]
DRAFTER = 1   # the first small model drafts


@dataclass
class CycleOut:
    """A cycle's tokens per row, P and the drafter's log-probs at its first position (for the
    drafters' records; the latter None without a small model), and its timings for the
    draft-length chooser ("draft", "verify" seconds; "n_draft", "n_verify", "accepted", "trials")."""

    tokens: list[list[int]]
    first: tuple[torch.Tensor, torch.Tensor | None]
    timing: dict = field(default_factory=dict)


@dataclass
class _Drafts:
    """The drafts of one cycle: tokens (B, g), the distributions they were drawn from (B, g, V), how
    many are valid per row (B,), and which rows drafted copies (B,) bool or None."""

    tokens: torch.Tensor
    logq: torch.Tensor
    lens: torch.Tensor
    copying: torch.Tensor | None


class Cycles:
    """The cycles of one decoding run over ``states`` (the LLM first, the drafter second)."""

    def __init__(self, states: list[ModelState], rule: Rule, cfg: GenerationConfig, stats: GenerationStats,
                 head: DraftHead | None = None):
        self.states, self.rule, self.cfg, self.stats, self.head = states, rule, cfg, stats, head

    def target(self, fused: torch.Tensor) -> torch.Tensor:
        """The distribution tokens come from: P itself (greedy), or P tempered and cut to top-k/top-p."""
        c = self.cfg
        return fused if c.greedy else transform(fused, c.temperature, c.top_k, c.top_p)

    @staticmethod
    def pick(logp: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Greedy argmax, or an inverse-CDF draw with the rows' uniforms: (N, V) -> (N,)."""
        return logp.argmax(-1).cpu() if u is None else sample(logp, u).cpu()

    # ---- plain ---------------------------------------------------------------------------------
    def plain(self, last: torch.Tensor, U: torch.Tensor | None) -> CycleOut:
        """Feed ``last`` (B,) to every model and pick the next token from P."""
        logps, timing = [], {}
        if any(hasattr(st.model, "forward_step_start") for st in self.states):   # models in actors: at once
            t0 = time.perf_counter()
            logps = [lp[:, 0] for lp in feed_all(self.states, last[:, None])]  # each (B, V)
            timing["verify"] = time.perf_counter() - t0
        for i, st in enumerate(self.states if not logps else []):
            t0 = time.perf_counter()
            logps.append(st.feed(last[:, None])[:, 0])  # (B, V)
            key = "draft" if i == DRAFTER else "verify"
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0
        target = self.target(self.rule(logps))
        y = self.pick(target, None if U is None else U[:, 0])
        self.stats.large_passes += 1
        return CycleOut([[t] for t in y.tolist()], (target, logps[DRAFTER] if len(logps) > 1 else None), timing)

    # ---- drafted by the small model --------------------------------------------------------------
    def drafted(self, last: torch.Tensor, g: int, U: torch.Tensor | None, copies: list[list[int]] | None = None,
                copy_seconds: float = 0.0) -> CycleOut:
        """Draft g tokens, verify them in one pass of every other model, commit 1..g+1 tokens per row.

        ``copies`` (hybrid drafting): a row with a copy from its own text drafts that copy (point
        masses, up to its length), the others draft with the SLM; the SLM runs on every row's drafts,
        for P. A copying row is treated exactly as in a lookup cycle, so its tokens do not depend on
        which cycle its batch runs."""
        drafter = self.states[DRAFTER]
        others = [s for i, s in enumerate(self.states) if i != DRAFTER]
        greedy = U is None
        t0 = time.perf_counter()
        d, raw = self._draft(last, g, U, copies)
        t1 = time.perf_counter()
        block = torch.cat([last[:, None], d.tokens], 1)  # (B, g + 1)
        vlp = feed_all(others, block)  # each (B, g + 1, V)
        t2 = time.perf_counter()

        def fused(drafter_logp: torch.Tensor, pos) -> torch.Tensor:
            lps = [v[:, pos] for v in vlp]
            lps.insert(DRAFTER, drafter_logp)
            return self.target(self.rule(lps))

        target = fused(raw, slice(0, g))  # (B, g, V)
        valid = None if d.copying is None else torch.arange(g)[None, :] < d.lens[:, None]
        n = accepted_counts(d.tokens, d.logq, target, None if greedy else U[:, g:2 * g], valid)  # (B,)
        y = self._after_drafts(n, d, target, U)
        t3 = time.perf_counter()
        full = torch.nonzero(n == g).squeeze(-1)
        lq_g = None
        if full.numel():  # every draft accepted somewhere: P at the bonus position needs the drafter there
            lq_g = drafter.feed(d.tokens[:, -1:])[:, 0]  # (B, V)
            bonus = fused(lq_g, g)  # (B, V): P from every model there, not the LLM's alone
            y[full] = self.pick(bonus[full], None if greedy else U[full, 2 * g])
        if self.head is not None:  # each row's distributions on its text join its candidate set
            self._observe_head(raw, lq_g, n, g)
        t4 = time.perf_counter()
        drafter.rollback(g + 1 if lq_g is not None else g, 1 + n)
        for st in others:
            st.rollback(g + 1, 1 + n)
        self._count(d.lens, n)
        timing = dict(draft=copy_seconds + t1 - t0 + t4 - t3, verify=t2 - t1, n_draft=g, accepted=int(n.sum()),
                      trials=int((n + (n < d.lens).long()).sum()))
        nl = n.tolist()
        tokens = [d.tokens[b, :nl[b]].tolist() + [int(y[b])] for b in range(len(nl))]
        return CycleOut(tokens, (target[:, 0], raw[:, 0]), timing)

    def _draft(self, last: torch.Tensor, g: int, U: torch.Tensor | None,
               copies: list[list[int]] | None) -> tuple[_Drafts, torch.Tensor]:
        """g drafts per row, step by step, and the drafter's exact log-probs (B, g, V) at each."""
        drafter, head, greedy = self.states[DRAFTER], self.head, U is None
        B = last.shape[0]
        restrict = head is not None and g > 1  # one draft: the whole head once either way
        lens = torch.full((B,), g, dtype=torch.long)  # valid drafts per row
        copying = None
        if copies is not None and any(copies):
            copying = torch.tensor([bool(c) for c in copies])  # (B,)
            lens = torch.tensor([len(c) if c else g for c in copies])
            copy_t = torch.tensor([c + [c[-1]] * (g - len(c)) if c else [0] * g for c in copies])  # (B, g), padded
        raw, logq, draft = [], [], []
        inp = last
        for i in range(g):
            if not restrict:
                lq = drafter.feed(inp[:, None])[:, 0]  # p_S at this position, (B, V)
                raw.append(lq)
            else:  # q_C: p_S renormalised on the candidate set (the exact p_S comes after the loop)
                with head.drafting():
                    lq = head.spread(drafter.feed(inp[:, None])[:, 0])
            q = lq if greedy else self.target(lq)
            x = self.pick(q, None if greedy else U[:, i])
            if copying is not None:  # copied drafts: q is a point mass on the copy
                x = torch.where(copying, copy_t[:, i], x)
                point = torch.full_like(q, -torch.inf).scatter_(-1, x[:, None].to(q.device), 0.0)
                q = torch.where(copying[:, None].to(q.device), point, q)
            logq.append(q)
            draft.append(x)
            inp = x
        exact = torch.stack(raw, 1) if not restrict else head.exact()  # the exact head once, on every drafted position
        return _Drafts(torch.stack(draft, 1), torch.stack(logq, 1), lens, copying), exact

    def _after_drafts(self, n: torch.Tensor, d: _Drafts, target: torch.Tensor, U: torch.Tensor | None) -> torch.Tensor:
        """Each row's token after its accepted drafts (B,): from the residual max(0, P - q) where a
        draft was rejected, from P after a whole copy shorter than g; rows that accepted all g drafts
        get theirs from the bonus position (0 here)."""
        greedy, g = U is None, d.tokens.shape[1]
        y = torch.zeros(n.shape[0], dtype=torch.long)
        rej = torch.nonzero(n < d.lens).squeeze(-1)
        if rej.numel():
            pos = n[rej]
            t_rej, q_rej = target[rej, pos], d.logq[rej, pos]  # (R, V)
            y[rej] = self.pick(t_rej if greedy else residual(t_rej, q_rej), None if greedy else U[rej, 2 * g])
        short = torch.nonzero((n == d.lens) & (d.lens < g)).squeeze(-1)
        if short.numel():
            y[short] = self.pick(target[short, n[short]], None if greedy else U[short, 2 * g])
        return y

    def _observe_head(self, raw: torch.Tensor, lq_g: torch.Tensor | None, n: torch.Tensor, g: int) -> None:
        self.head.count_coverage(raw, n)
        nl, is_full = n.tolist(), (n == g).tolist()
        self.head.observe([torch.cat([raw[b, :min(nl[b] + 1, g)]] + ([lq_g[b:b + 1]] if is_full[b] else []))
                           for b in range(len(nl))])

    def _count(self, lens: torch.Tensor, n: torch.Tensor) -> None:
        s = self.stats
        s.large_passes += 1
        s.drafted += int(lens.sum())
        s.accepted += int(n.sum())

    # ---- copies only ---------------------------------------------------------------------------------
    def lookup(self, last: torch.Tensor, g: int, U: torch.Tensor | None, drafts: list[list[int]],
               copy_seconds: float = 0.0) -> CycleOut:
        """Drafts copied from each row's own text (``drafts``: up to g, fewer where the match is
        short), scored by every model in one pass over [last, drafts], verified against P like model
        drafts. A copied draft is a point mass q = 1{x = d}: it is accepted with probability P(d), and
        a rejection draws from max(0, P - q) normalised, which is P with d removed."""
        G = max(len(d) for d in drafts)
        if G == 0:  # nothing to copy anywhere in the batch: a plain step
            out = self.plain(last, None if U is None else U[:, 2 * g:])
            # nothing was drafted: every model's step is a one-token pass (for the draft-length chooser)
            t = out.timing
            out.timing = dict(verify=t["verify"] + t.get("draft", 0.0), n_verify=1, draft=0.0)
            return out
        B = last.shape[0]
        lens = torch.tensor([len(d) for d in drafts])
        draft_t = torch.tensor([d + [d[-1] if d else 0] * (G - len(d)) for d in drafts], dtype=torch.long)  # (B, G)
        valid = torch.arange(G)[None, :] < lens[:, None]
        t1 = time.perf_counter()
        block = torch.cat([last[:, None], draft_t], 1)  # (B, G + 1)
        lps = feed_all(self.states, block)
        target = self.target(self.rule(lps))  # (B, G + 1, V): P at every position
        first = (target[:, 0], lps[DRAFTER][:, 0] if len(lps) > 1 else None)
        t2 = time.perf_counter()
        point_mass = target.new_zeros(1, 1, 1).expand(B, G, target.shape[-1])  # log q(d) = 0 (a view)
        n = accepted_counts(draft_t, point_mass, target[:, :G], None if U is None else U[:, g:g + G], valid)
        at = target[torch.arange(B), n]  # (B, V): P where each row's accepted drafts end
        if U is None:
            y = self.pick(at, None)
        else:
            rej = n < lens
            q = torch.full_like(at, -torch.inf)
            q[torch.arange(B), draft_t[torch.arange(B), n.clamp(max=G - 1)]] = 0.0
            dist = torch.where(rej[:, None].to(at.device), residual(at, q).to(at.dtype), at)
            y = self.pick(dist, U[:, 2 * g])
        for st in self.states:
            st.rollback(G + 1, 1 + n)
        self._count(lens, n)
        timing = dict(draft=copy_seconds, verify=t2 - t1, n_verify=G + 1, n_draft=g, accepted=int(n.sum()),
                      trials=int((n + (n < lens).long()).sum()))
        nl = n.tolist()
        return CycleOut([draft_t[b, :nl[b]].tolist() + [int(y[b])] for b in range(B)], first, timing)
