"""The decoding loop: one state per model, fused greedy, sampling and speculative decoding.

Invariant between cycles: every model has seen every committed token of a row except the
last one (``last``). A plain cycle feeds ``last`` to each model and picks the next token from
the fused distribution P. A speculative cycle drafts g tokens (a ``Drafter`` says who: the
first small model, copies from the row's own text, or per row either), runs the models over
``last`` and the drafts, and verifies them against P (``cycles.py``, ``speculative.py``). The
loop is the same whichever drafter runs.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig
from arfuse.generation.cycles import DRAFTER, CycleOut, Cycles, Rule
from arfuse.generation.draft_head import DraftHead
from arfuse.generation.draft_length import DraftLength
from arfuse.generation.drafters import DRAFTERS, Drafter, Plan, make_drafter
from arfuse.generation.results import Chunk, GenerationResult, GenerationStats, Row, commit
from arfuse.generation.state import ModelState, left_padded
from arfuse.generation.text_decoder import TextDecoder

__all__ = ["Chunk", "Decoder", "GenerationResult", "GenerationStats"]


class Decoder(TextDecoder):
    """Generates from the fused distribution of ``models`` (the LLM first) under ``rule``, a callable
    from the models' log-probs to the fused ones with a ``describe()``. The caller has checked that
    the rule can fuse these models (one tokenizer for a token-level rule)."""

    def __init__(self, models: Sequence[CausalLM], rule: Rule, config: GenerationConfig):
        if config.speculative is not None and config.draft in DRAFTERS and DRAFTERS[config.draft].uses_slm \
                and len(models) < 2:
            raise ArfuseError("speculative decoding needs a small model to draft: give --small, use --draft lookup "
                              "(drafts copied from the text itself), or drop --speculative")
        # the default drafter: hybrid with a small model, copies from the text without one
        self.draft = config.draft if config.draft != "auto" else ("hybrid" if len(models) > 1 else "lookup")
        self.models = list(models)
        self.rule = rule
        self.cfg = config
        self.tok = models[0]
        self.stats = GenerationStats(rule=getattr(rule, "describe", lambda: str(rule))(),
                                     mode="greedy" if config.greedy else "sampling")
        self.results: list[GenerationResult] = []
        self._rows: list[Row] = []
        self._checked: tuple[list[str], list[list[list[int]]]] | None = None

    # ---- prompts -------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str]) -> list[list[list[int]]]:
        """Every model's token ids of every prompt, ``[model][prompt]``, each checked against that
        model's context (``truncate="left"`` drops the oldest tokens) and the models' tokenizations
        compared, before any model runs: a prompt too long fails at once, not after a prefill.
        ``run`` calls it; a caller may call it first (the CLI, before echoing the prompt)."""
        ids = super().check_prompts(prompts)
        lasts = [[s[-1] for s in seqs] for seqs in ids]
        for m, ls in zip(self.models[1:], lasts[1:]):
            if ls != lasts[0]:
                raise ArfuseError(f"the models tokenize the prompt differently ({self.models[0].info.name} and "
                                  f"{m.info.name}): token-level fusion needs one tokenizer (the same vocabulary "
                                  "and merges)")
        return ids

    def _headroom(self) -> int:
        """Sampling drafts past max_new_tokens in the last cycle (its surplus is dropped)."""
        c = self.cfg
        return 0 if c.speculative is None or c.greedy else (c.max_draft if c.speculative == "auto" else c.speculative)

    def _prefill(self, states: list[ModelState], prompts: list[str],
                 head: DraftHead | None) -> tuple[torch.Tensor, list[Row]]:
        """Feed every model its prompts but the last token, left-padded; the last tokens (B,) and
        each prompt's row."""
        all_ids = self.check_prompts(prompts)   # every length checked before any model runs
        contexts = all_ids[0]
        last = torch.tensor([s[-1] for s in contexts])
        for i, (st, seqs) in enumerate(zip(states, all_ids)):
            padded = left_padded(seqs)
            if padded is None:
                continue
            ids, mask = padded
            lp = st.feed(ids, mask)
            if head is not None and i == DRAFTER:
                real = mask.to(lp.device)
                head.observe([lp[b][real[b]] for b in range(len(seqs))])
        rows = [Row(i, p, ctx, self.cfg.seed + i) for i, (p, ctx) in enumerate(zip(prompts, contexts))]
        return last, rows

    def row_text(self, index: int) -> str:
        """The text generated so far for prompt ``index`` (final once its last chunk came)."""
        return self._rows[index].text

    # ---- the loop ------------------------------------------------------------------------
    def run(self, prompts: Sequence[str]) -> Iterator[Chunk]:
        """Chunks of every prompt's text as cycles commit tokens; ``results`` and ``stats`` at the end."""
        cfg = self.cfg
        start = time.perf_counter()
        prompts = list(prompts)
        self.check_prompts(prompts)
        states = [ModelState(m) for m in self.models]
        drafter = make_drafter(self.draft, cfg) if cfg.speculative is not None else None
        head = self._draft_head(drafter, len(prompts))
        kernels = self._kernels()
        with kernels():
            last, rows = self._prefill(states, list(prompts), head)
        self._rows = rows
        self.results = []
        cycles = Cycles(states, self.rule, cfg, self.stats, head)
        choosers: dict[str, DraftLength] = {}   # one per kind of cycle ("slm", "lookup"): their costs differ
        active = list(range(len(rows)))
        while active:
            live = [rows[i] for i in active]
            plan, g, chooser = self._plan(drafter, live, choosers)
            U = None if cfg.greedy else torch.stack(
                [torch.rand(2 * g + 1, generator=r.gen, dtype=torch.float64) for r in live])  # (B, 2g + 1)
            t0 = time.perf_counter()
            with kernels():
                out = self._cycle(cycles, plan, g, last, U)
            if drafter is not None:
                drafter.observe(live, out.first)
            self._account(plan, g, chooser, out, t0)
            active, last = yield from self._commit(rows, active, out.tokens, states, head)
        self._finish(start, head, rows)

    def _draft_head(self, drafter: Drafter | None, batch: int) -> DraftHead | None:
        """The drafting SLM's head restricted to likely tokens while it drafts (``draft_head.py``)."""
        head = None
        if drafter is not None and drafter.uses_slm and self.cfg.draft_head == "candidates":
            head = DraftHead.for_model(self.models[DRAFTER], shared_rows_once=self.cfg.fast_kernels)
        self.stats.draft_head = "candidates" if head is not None else "full"
        if head is not None:
            head.start(batch)
        return head

    def _kernels(self) -> Callable[[], contextlib.AbstractContextManager]:
        """Entering the result switches every model's few-row kernels on (``arfuse.adapters.kernels``)
        for the model calls; they are switched back before every yield, so a paused stream leaves the
        models as they were."""
        unique = list({id(m): m for m in self.models}.values())
        kernels = [m.fast_kernels() for m in unique] if self.cfg.fast_kernels else []

        @contextlib.contextmanager
        def active():
            with contextlib.ExitStack() as stack:
                for k in kernels:
                    stack.enter_context(k.active())
                yield
        return active

    def _plan(self, drafter: Drafter | None, live: list[Row],
              choosers: dict[str, DraftLength]) -> tuple[Plan | None, int, DraftLength | None]:
        """The next cycle's plan, its number of drafts g (0: a plain cycle) and the chooser that gave g."""
        cfg = self.cfg
        if drafter is None:
            return None, 0, None
        cap = cfg.max_draft if cfg.speculative == "auto" else int(cfg.speculative)
        plan = drafter.propose(live, cap)
        chooser = None
        if cfg.speculative == "auto":
            chooser = choosers.setdefault(plan.kind, DraftLength(g_max=cfg.max_draft))
            g = chooser.next()
            self.stats.draft_lengths.append(g)
        else:
            g = int(cfg.speculative)
        if cfg.greedy:  # sampling keeps g, so that each row's random stream is used alike in any batch
            remaining = min(cfg.max_new_tokens - len(r.ids) for r in live)
            g = max(0, min(g, remaining - 1))
        return plan, g, chooser

    @staticmethod
    def _cycle(cycles: Cycles, plan: Plan | None, g: int, last: torch.Tensor, U: torch.Tensor | None) -> CycleOut:
        if not g:
            return cycles.plain(last, U)
        copies = None if plan.copies is None else [c[:g] for c in plan.copies]
        if plan.kind == "lookup":
            return cycles.lookup(last, g, U, copies, plan.seconds)
        return cycles.drafted(last, g, U, copies, plan.seconds)

    def _account(self, plan: Plan | None, g: int, chooser: DraftLength | None, out: CycleOut, t0: float) -> None:
        """The cycle's timings to its draft-length chooser, its counts to the statistics."""
        timing = out.timing
        if chooser:
            t_draft = timing.get("draft", 0.0)
            other = time.perf_counter() - t0 - timing["verify"] - t_draft
            chooser.update(timing.get("accepted", 0), timing.get("trials", 0), timing.get("n_draft", 0), t_draft,
                           timing.get("n_verify", g + 1), timing["verify"], max(other, 0.0))
        s = self.stats
        s.cycles += 1
        if g:
            s.cycles_by_draft[plan.label] = s.cycles_by_draft.get(plan.label, 0) + 1
            s.draft_seconds += timing.get("draft", 0.0)
            s.verify_seconds += timing.get("verify", 0.0)

    def _commit(self, rows: list[Row], active: list[int], tokens: list[list[int]], states: list[ModelState],
                head: DraftHead | None):
        """Commit each active row's tokens, yielding its chunks; drop the rows that finished from every
        state. Returns the rows still active and their last tokens."""
        keep, new_last = [], []
        for j, i in enumerate(active):
            before = len(rows[i].ids)
            chunk = commit(rows[i], tokens[j], self.cfg, self.tok)
            self.stats.new_tokens += len(rows[i].ids) - before
            if chunk is not None:
                yield chunk
            if rows[i].reason is None:
                keep.append(j)
                new_last.append(tokens[j][-1])
        if keep and len(keep) < len(active):
            sel = torch.tensor(keep, dtype=torch.long)
            for st in states:
                st.select(sel)
            if head is not None:
                head.select(sel)
        return [active[j] for j in keep], torch.tensor(new_last, dtype=torch.long)

    def _finish(self, start: float, head: DraftHead | None, rows: list[Row]) -> None:
        s = self.stats
        s.seconds = time.perf_counter() - start
        if head is not None:
            s.draft_vocab = head.size
            s.draft_head_covered, s.draft_head_positions = head.covered, head.positions
        if self.cfg.speculative is not None and self.cfg.speculative != "auto":
            s.draft_lengths = [int(self.cfg.speculative)]
        self.results = [r.result() for r in rows]
