"""The decoding loop: one state per model, fused greedy, sampling and speculative decoding.

Invariant between cycles: every model has seen every committed token of a row except the
last one (``last``). A plain cycle feeds ``last`` to each model and picks the next token from
the fused distribution P. A speculative cycle lets the drafting model (the first small one)
propose g tokens from its own distribution q, runs each other model once over
``last`` and the drafts, and verifies them against P (see ``speculative.py``); the drafter
sees one more token only when every draft was accepted, for P at the bonus position.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig
from arfuse.generation.draft_head import DraftHead
from arfuse.generation.draft_length import DraftLength, DraftSources
from arfuse.generation.sampling import residual, sample, transform
from arfuse.generation.speculative import accepted_counts, lookup_match
from arfuse.generation.kernels import SmallRowLinears
from arfuse.generation.state import ModelState

Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass
class Chunk:
    """New text of one prompt, as it comes: ``index`` is the prompt's position in the input list."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # set on a prompt's last chunk: "length", "stop" or "eos"


@dataclass
class GenerationResult:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats | None = None   # of the whole call (shared by a batch's results)


@dataclass
class GenerationStats:
    rule: str
    mode: str
    new_tokens: int = 0
    seconds: float = 0.0
    cycles: int = 0
    large_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)
    cycles_by_draft: dict[str, int] = field(default_factory=dict)   # speculative cycles by drafter: "slm",
    # "lookup", "slm+copies" (hybrid: the rows with a copy drafted it, the SLM drafted the others)
    draft_seconds: float = 0.0           # drafting in speculative cycles (model drafts: the drafter's steps)
    verify_seconds: float = 0.0          # verifying passes of speculative cycles
    draft_head: str = "full"             # "candidates": the drafter's head scored a candidate set while drafting
    draft_vocab: int = 0                 # the candidate set's final size
    draft_head_covered: int = 0          # drafted positions whose exact best SLM token was in the candidate set
    draft_head_positions: int = 0

    @property
    def draft_head_coverage(self) -> float | None:
        """Share of drafted positions where the SLM's exact best token was among its candidates."""
        return self.draft_head_covered / self.draft_head_positions if self.draft_head_positions else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts over drafted tokens (None without speculation)."""
        return self.accepted / self.drafted if self.drafted else None


def check_same_vocab(models: Sequence[CausalLM]) -> None:
    big = models[0]
    for m in models[1:]:
        if m.info.vocab_size != big.info.vocab_size or m.tokenizer_fingerprint() != big.tokenizer_fingerprint():
            raise ArfuseError(
                f"vocabularies differ ({big.info.vocab_size:,} tokens in {big.info.name} vs {m.info.vocab_size:,} in "
                f"{m.info.name}, or different tokenizers): the linear and cosine rules need one tokenizer; models with "
                "different tokenizers need the top-k-union rule (--rule union)")


class _Row:
    """One prompt's output so far."""

    def __init__(self, index: int, prompt: str, prompt_tokens: int, seed: int):
        self.index, self.prompt, self.prompt_tokens = index, prompt, prompt_tokens
        self.ids: list[int] = []
        self.context: list[int] = []   # the LLM's prompt token ids (lookup drafting searches them too)
        self.text = ""
        self.emitted = 0
        self.reason: str | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self.sources = DraftSources()  # hybrid drafting: copy or SLM, by what was accepted on this row's text


class Decoder:
    """Generates from the fused distribution of ``models`` (the LLM first) under ``rule``."""

    def __init__(self, models: Sequence[CausalLM], rule: Rule, config: GenerationConfig):
        if config.speculative is not None and config.draft in ("slm", "hybrid") and len(models) < 2:
            raise ArfuseError("speculative decoding needs a small model to draft: give --small, use --draft lookup "
                              "(drafts copied from the text itself), or drop --speculative")
        check_same_vocab(models)
        # the default drafter: hybrid with a small model, copies from the text without one
        self.draft = config.draft if config.draft != "auto" else ("hybrid" if len(models) > 1 else "lookup")
        self.models = list(models)
        self.rule = rule
        self.cfg = config
        self.tok = models[0]
        self.stats = GenerationStats(rule=getattr(rule, "describe", lambda: str(rule))(),
                                     mode="greedy" if config.greedy else "sampling")

    # ---- prompts -------------------------------------------------------------------------
    def _prompt_ids(self, model: CausalLM, text: str) -> list[int]:
        ids = model.encode(text).ids
        bos = [model.bos_id] if model.uses_bos(self.cfg.bos) else []
        limit = model.info.max_length
        c = self.cfg
        # sampling drafts past max_new_tokens in the last cycle (its surplus is dropped)
        headroom = 0 if c.speculative is None or c.greedy else (c.max_draft if c.speculative == "auto" else c.speculative)
        if limit is not None and len(bos) + len(ids) + c.max_new_tokens + headroom > limit:
            room = limit - c.max_new_tokens - headroom - len(bos)
            if self.cfg.truncate == "left" and room >= 1:
                ids = ids[len(ids) - room:]
            else:
                raise ArfuseError(
                    f"prompt of {len(bos) + len(ids):,} tokens plus {self.cfg.max_new_tokens} new tokens exceeds "
                    f"{model.info.name}'s context of {limit:,} tokens: shorten the prompt, lower max_new_tokens, "
                    + ("" if self.cfg.truncate == "left" else "or pass truncate='left' (--truncate left) to drop "
                       "the prompt's oldest tokens"))
        if not bos + ids:
            raise ArfuseError("the prompt is empty and the model adds no BOS token: give some text (or --bos always)")
        return bos + ids

    def _prefill(self, states: list[ModelState], prompts: list[str]) -> tuple[torch.Tensor, list[int], list[list[int]]]:
        """Feed every model its prompts but the last token; return the last tokens (B,), the prompt
        lengths and the LLM's prompt token ids."""
        last = None
        n_prompt = []
        for m, st in zip(self.models, states):
            seqs = [self._prompt_ids(m, p) for p in prompts]
            lasts = torch.tensor([s[-1] for s in seqs])
            if last is None:
                last, n_prompt, contexts = lasts, [len(s) for s in seqs], seqs
            elif not torch.equal(last, lasts):
                raise ArfuseError("the models tokenize the prompt differently: the linear and cosine rules need one "
                                  "tokenizer; use the top-k-union rule (--rule union) for different tokenizers")
            width = max(len(s) - 1 for s in seqs)
            if width:
                ids = torch.zeros(len(seqs), width, dtype=torch.long)
                mask = torch.zeros(len(seqs), width, dtype=torch.bool)
                for b, s in enumerate(seqs):  # left padding
                    n = len(s) - 1
                    if n:
                        ids[b, width - n:] = torch.tensor(s[:-1])
                        mask[b, width - n:] = True
                lp = st.feed(ids, mask)
                if self._draft_head is not None and st is states[1]:
                    real = mask.to(lp.device)
                    self._draft_head.observe([lp[b][real[b]] for b in range(len(seqs))])
        return last, n_prompt, contexts

    # ---- choosing tokens -----------------------------------------------------------------
    def _target(self, fused: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return fused if c.greedy else transform(fused, c.temperature, c.top_k, c.top_p)

    def _pick(self, logp: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Greedy argmax, or an inverse-CDF draw with the rows' uniforms: (N, V) -> (N,)."""
        return logp.argmax(-1).cpu() if u is None else sample(logp, u).cpu()

    # ---- one cycle -----------------------------------------------------------------------
    def _plain_cycle(self, states, last, U, timing: dict):
        logps = []
        for i, st in enumerate(states):
            t0 = time.perf_counter()
            logps.append(st.feed(last[:, None])[:, 0])  # (B, V)
            key = "draft" if i == 1 else "verify"
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0
        target = self._target(self.rule(logps))
        self._first = (target, logps[1] if len(logps) > 1 else None)
        y = self._pick(target, None if U is None else U[:, 0])
        self.stats.large_passes += 1
        return [[t] for t in y.tolist()]

    def _spec_cycle(self, states, last, g: int, U, timing: dict, copies: list[list[int]] | None = None):
        """Draft g tokens, verify them in one pass of every other model, commit 1..g+1 tokens per row.

        ``copies`` (hybrid drafting): a row with a copy from its own text drafts that copy (point
        masses, up to its length), the others draft with the SLM; the SLM runs on every row's drafts,
        for P. A copying row is treated exactly as in a lookup cycle, so its tokens do not depend on
        which cycle its batch runs."""
        d = 1  # the first small model drafts
        drafter, others = states[d], [s for i, s in enumerate(states) if i != d]
        B = last.shape[0]
        greedy = U is None
        t0 = time.perf_counter()
        head = self._draft_head
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
            q = lq if greedy else self._target(lq)
            x = self._pick(q, None if greedy else U[:, i])
            if copying is not None:  # copied drafts: q is a point mass on the copy
                x = torch.where(copying, copy_t[:, i], x)
                point = torch.full_like(q, -torch.inf).scatter_(-1, x[:, None].to(q.device), 0.0)
                q = torch.where(copying[:, None].to(q.device), point, q)
            logq.append(q)
            draft.append(x)
            inp = x
        draft_t = torch.stack(draft, 1)  # (B, g)
        logq_t = torch.stack(logq, 1)  # (B, g, V)
        if not restrict:
            raw_t = torch.stack(raw, 1)
        else:  # the exact head once, on every drafted position
            raw_t = head.exact()  # (B, g, V)
        t1 = time.perf_counter()
        block = torch.cat([last[:, None], draft_t], 1)  # (B, g + 1)
        vlp = [st.feed(block) for st in others]  # each (B, g + 1, V)
        t2 = time.perf_counter()

        def fused(pos_logps_drafter, pos):
            lps = list(vlp)
            lps = [v[:, pos] for v in lps]
            lps.insert(d, pos_logps_drafter)
            return self._target(self.rule(lps))

        target = fused(raw_t, slice(0, g))  # (B, g, V)
        self._first = (target[:, 0], raw_t[:, 0])
        valid = None if copying is None else torch.arange(g)[None, :] < lens[:, None]
        n = accepted_counts(draft_t, logq_t, target, None if greedy else U[:, g:2 * g], valid)  # (B,)
        y = torch.zeros(B, dtype=torch.long)
        rej = torch.nonzero(n < lens).squeeze(-1)
        if rej.numel():
            pos = n[rej]
            t_rej, q_rej = target[rej, pos], logq_t[rej, pos]  # (R, V)
            y[rej] = self._pick(t_rej if greedy else residual(t_rej, q_rej), None if greedy else U[rej, 2 * g])
        short = torch.nonzero((n == lens) & (lens < g)).squeeze(-1)  # a whole copy shorter than g: P after it
        if short.numel():
            y[short] = self._pick(target[short, n[short]], None if greedy else U[short, 2 * g])
        full = torch.nonzero(n == g).squeeze(-1)
        fed_drafter = g
        t3 = time.perf_counter()
        if full.numel():
            lq_g = drafter.feed(draft_t[:, -1:])[:, 0]  # p_S at the bonus position, (B, V)
            fed_drafter = g + 1
            bonus = fused(lq_g, g)  # (B, V): P from every model there, not the LLM's alone
            y[full] = self._pick(bonus[full], None if greedy else U[full, 2 * g])
        nl = n.tolist()
        if head is not None:  # each row's distributions on its text join its candidate set
            head.count_coverage(raw_t, n)
            is_full = (n == g).tolist()
            head.observe([torch.cat([raw_t[b, :min(nl[b] + 1, g)]] + ([lq_g[b:b + 1]] if is_full[b] else []))
                          for b in range(B)])
        t4 = time.perf_counter()
        drafter.rollback(fed_drafter, 1 + n)
        for st in others:
            st.rollback(g + 1, 1 + n)
        s = self.stats
        s.large_passes += 1
        s.drafted += int(lens.sum())
        s.accepted += int(n.sum())
        timing.update(draft=timing.get("draft", 0.0) + t1 - t0 + t4 - t3, verify=t2 - t1, n_draft=g,
                      accepted=int(n.sum()), trials=int((n + (n < lens).long()).sum()))
        return [draft_t[b, :nl[b]].tolist() + [int(y[b])] for b in range(B)]

    def _lookup_cycle(self, states, last, g: int, U, timing: dict, drafts: list[list[int]]):
        """Drafts copied from each row's own text (``drafts``: up to g, fewer where the match is
        short), scored by every model in one pass over [last, drafts], verified against P like model
        drafts. A copied draft is a point mass q = 1{x = d}: it is accepted with probability P(d), and
        a rejection draws from max(0, P - q) normalised, which is P with d removed."""
        G = max(len(d) for d in drafts)
        if G == 0:  # nothing to copy anywhere in the batch: a plain step
            timing.pop("draft")
            out = self._plain_cycle(states, last, None if U is None else U[:, 2 * g:], timing)
            # nothing was drafted: every model's step is a one-token pass (for the draft-length chooser)
            timing.update(verify=timing["verify"] + timing.pop("draft", 0.0), n_verify=1, draft=0.0)
            return out
        B = last.shape[0]
        lens = torch.tensor([len(d) for d in drafts])
        draft_t = torch.tensor([d + [d[-1] if d else 0] * (G - len(d)) for d in drafts], dtype=torch.long)  # (B, G)
        valid = torch.arange(G)[None, :] < lens[:, None]
        t1 = time.perf_counter()
        block = torch.cat([last[:, None], draft_t], 1)  # (B, G + 1)
        lps = [st.feed(block) for st in states]
        target = self._target(self.rule(lps))  # (B, G + 1, V): P at every position
        self._first = (target[:, 0], lps[1][:, 0] if len(lps) > 1 else None)
        t2 = time.perf_counter()
        point_mass = target.new_zeros(1, 1, 1).expand(B, G, target.shape[-1])  # log q(d) = 0 (a view)
        n = accepted_counts(draft_t, point_mass, target[:, :G], None if U is None else U[:, g:g + G], valid)
        at = target[torch.arange(B), n]  # (B, V): P where each row's accepted drafts end
        if U is None:
            y = self._pick(at, None)
        else:
            rej = n < lens
            q = torch.full_like(at, -torch.inf)
            q[torch.arange(B), draft_t[torch.arange(B), n.clamp(max=G - 1)]] = 0.0
            dist = torch.where(rej[:, None].to(at.device), residual(at, q).to(at.dtype), at)
            y = self._pick(dist, U[:, 2 * g])
        for st in states:
            st.rollback(G + 1, 1 + n)
        s = self.stats
        s.large_passes += 1
        s.drafted += int(lens.sum())
        s.accepted += int(n.sum())
        timing.update(verify=t2 - t1, n_verify=G + 1, n_draft=g, accepted=int(n.sum()),
                      trials=int((n + (n < lens).long()).sum()))
        nl = n.tolist()
        return [draft_t[b, :nl[b]].tolist() + [int(y[b])] for b in range(B)]

    def _score_sources(self, rows: list[_Row], found: list[tuple[list[int], int]]) -> None:
        """Each row's record of the draft sources (hybrid): would the SLM's first draft and the copy
        (by its match length) have been accepted at this cycle's first position? Greedy: is it P's
        argmax; sampling: the chance that it is accepted, sum_v min(P, q) for the SLM, P(d) for a copy."""
        logp, logq = self._first  # (B, V) each: P at the cycle's first position, the SLM's log-probs there
        if logq is None:
            return
        if self.cfg.greedy:
            best = logp.argmax(-1)
            slm = (logq.argmax(-1) == best).double()
            copy_of = lambda b, d: float(d == int(best[b]))  # noqa: E731
        else:
            p = logp.double().exp()
            slm = torch.minimum(p, self._target(logq).double().exp()).sum(-1)
            copy_of = lambda b, d: float(p[b, d])  # noqa: E731
        for b, (row, (copy, n)) in enumerate(zip(rows, found)):
            row.sources.update("slm", float(slm[b]))
            if copy:
                row.sources.update(n, copy_of(b, copy[0]))

    # ---- text ----------------------------------------------------------------------------
    def _commit(self, row: _Row, tokens: list[int]) -> Chunk | None:
        cfg = self.cfg
        new: list[int] = []
        for t in tokens:
            if cfg.stop_at_eos and self.tok.eos_id is not None and t == self.tok.eos_id:
                row.reason = "eos"
                break
            row.ids.append(t)
            new.append(t)
            row.text = self.tok.decode(row.ids)
            hits = [i for i in (row.text.find(s) for s in cfg.stop) if i >= 0]
            if hits:
                row.text = row.text[:min(hits)]
                row.reason = "stop"
                break
            if len(row.ids) >= cfg.max_new_tokens:
                row.reason = "length"
                break
        safe = row.text
        if row.reason is None:
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next byte
            hold = max((k for s in cfg.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
            safe = safe[:len(safe) - hold]  # text that may start a stop string waits too
        delta = safe[row.emitted:] if len(safe) > row.emitted else ""
        row.emitted = max(row.emitted, len(safe))
        if delta or new or row.reason:
            return Chunk(row.index, delta, new, row.reason)
        return None

    def row_text(self, index: int) -> str:
        """The text generated so far for prompt ``index`` (final once its last chunk came)."""
        return self._rows[index].text

    # ---- the loop ------------------------------------------------------------------------
    def run(self, prompts: Sequence[str]) -> Iterator[Chunk]:
        cfg = self.cfg
        start = time.perf_counter()
        states = [ModelState(m) for m in self.models]
        # the drafter's head restricted to likely tokens while it drafts (arfuse.generation.draft_head)
        self._draft_head = None
        if cfg.speculative is not None and self.draft in ("slm", "hybrid") and cfg.draft_head == "candidates":
            self._draft_head = DraftHead.for_model(self.models[1], shared_rows_once=cfg.fast_kernels)
        self.stats.draft_head = "candidates" if self._draft_head is not None else "full"
        if self._draft_head is not None:
            self._draft_head.start(len(prompts))
        # few-row products as W @ x.T during the model calls (arfuse.generation.kernels), switched
        # back before every yield: a paused stream leaves the models as they were
        kernels = SmallRowLinears(self.models, cfg.fast_kernels).active
        with kernels():
            last, n_prompt, contexts = self._prefill(states, list(prompts))
        rows = [_Row(i, p, n, cfg.seed + i) for i, (p, n) in enumerate(zip(prompts, n_prompt))]
        for r, ctx in zip(rows, contexts):
            r.context = ctx
        self._rows = rows
        active = list(range(len(rows)))
        choosers: dict[str, DraftLength] = {}   # one per drafter ("slm", "lookup"): their costs differ
        chooser = None
        self.results: list[GenerationResult] = []
        while active:
            remaining = min(cfg.max_new_tokens - len(rows[i].ids) for i in active)
            g = 0
            kind = self.draft
            found = None
            if cfg.speculative is not None:
                copies, t_copy = None, 0.0
                if kind in ("lookup", "hybrid"):  # each row's copy, as long as any g may use (cut to g below)
                    t_copy = time.perf_counter()
                    cap = cfg.max_draft if cfg.speculative == "auto" else int(cfg.speculative)
                    found = [lookup_match(rows[i].context + rows[i].ids, cap) for i in active]
                    copies = [c for c, _ in found]
                    if kind == "hybrid":  # a row copies where copies of that match length have done at
                        # least as well as the SLM's drafts on its text so far, else the SLM drafts it
                        copies = [c if rows[i].sources.prefers_copy(n) else [] for i, (c, n) in zip(active, found)]
                    t_copy = time.perf_counter() - t_copy
                if kind == "hybrid":  # one pass for every model where every row copies;
                    kind = "lookup" if all(copies) else "slm"  # else the SLM drafts the rows that do not
                if cfg.speculative == "auto":
                    chooser = choosers.setdefault(kind, DraftLength(g_max=cfg.max_draft))
                    g = chooser.next()
                    self.stats.draft_lengths.append(g)
                else:
                    g = int(cfg.speculative)
                if cfg.greedy:  # sampling keeps g, so that each row's random stream is used alike in any batch
                    g = max(0, min(g, remaining - 1))
            U = None if cfg.greedy else torch.stack(
                [torch.rand(2 * g + 1, generator=rows[i].gen, dtype=torch.float64) for i in active])  # (B, 2g + 1)
            t0 = time.perf_counter()
            timing: dict = {}
            with kernels():
                if not g:
                    out = self._plain_cycle(states, last, U, timing)
                elif kind == "lookup":
                    timing["draft"] = t_copy
                    out = self._lookup_cycle(states, last, g, U, timing, [c[:g] for c in copies])
                elif copies is not None:  # hybrid: rows with a copy draft it, the SLM drafts the others
                    timing["draft"] = t_copy
                    out = self._spec_cycle(states, last, g, U, timing, [c[:g] for c in copies])
                else:
                    out = self._spec_cycle(states, last, g, U, timing)
            if self.draft == "hybrid" and found is not None:
                self._score_sources([rows[i] for i in active], found)
            if chooser:
                t_draft = timing.get("draft", 0.0)
                other = time.perf_counter() - t0 - timing["verify"] - t_draft
                chooser.update(timing.get("accepted", 0), timing.get("trials", 0), timing.get("n_draft", 0), t_draft,
                               timing.get("n_verify", g + 1), timing["verify"], max(other, 0.0))
            self.stats.cycles += 1
            if g:
                label = "slm+copies" if kind == "slm" and copies is not None and any(copies) else kind
                self.stats.cycles_by_draft[label] = self.stats.cycles_by_draft.get(label, 0) + 1
                self.stats.draft_seconds += timing.get("draft", 0.0)
                self.stats.verify_seconds += timing.get("verify", 0.0)
            keep, new_last = [], []
            for j, i in enumerate(active):
                before = len(rows[i].ids)
                chunk = self._commit(rows[i], out[j])
                self.stats.new_tokens += len(rows[i].ids) - before
                if chunk is not None:
                    yield chunk
                if rows[i].reason is None:
                    keep.append(j)
                    new_last.append(out[j][-1])
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long)
                if keep:
                    for st in states:
                        st.select(sel)
                    if self._draft_head is not None:
                        self._draft_head.select(sel)
                active = [active[j] for j in keep]
            last = torch.tensor(new_last, dtype=torch.long)
        self.stats.seconds = time.perf_counter() - start
        if self._draft_head is not None:
            s = self.stats
            s.draft_vocab = self._draft_head.size
            s.draft_head_covered, s.draft_head_positions = self._draft_head.covered, self._draft_head.positions
        if cfg.speculative is not None and cfg.speculative != "auto":
            self.stats.draft_lengths = [int(cfg.speculative)]
        self.results = [GenerationResult(r.prompt, r.text, r.ids, r.reason, r.prompt_tokens) for r in rows]
