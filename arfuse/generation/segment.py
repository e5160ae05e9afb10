"""Segment-level ensembling with verification (SpecFuse: Lv et al., "SpecFuse: Ensembling Large
Language Models via Next-Segment Prediction"), for models with any tokenizers.

Each round, every drafting model extends its own sequence by up to L tokens (greedy, or sampled
with the config's temperature, top-k and top-p), the draft cut at its last word end; then every
verifying model scores every candidate segment in one batched pass: its cached rows are
replicated once per candidate (``StepState.select`` with repeated rows), each candidate's text
tokenized as a continuation by that model's own tokenizer (only the new text; a drafter reads
its own tokens), right-padded, so candidates never see each other. A candidate's score by one
model is the mean over that model's tokens of it of their log-probability (``scorer="logprob"``),
its log-probability per byte of the candidate (``"byte"``) or the mean raw logit (``"logit"``, the
released code's choice); the first token's comes from the
prefix's last position, kept from the round before. Candidates are ranked by
``sum_m w_m score_m``, with per-prompt Hedge weights ``w_m ∝ exp(-eta * losses_m)`` (losses_m:
rounds so far in which model m's candidate lost), normalised over the verifying models.

Scales across models: mean log-probs are in nats per token of each model's own tokenization, so
they are summed as they are; a model with a small vocabulary (more, likelier tokens per text)
then speaks louder. Per byte (``"byte"``) every model's score is in one unit, nats per byte of the
candidate, whatever its tokenizer: the segment mixture's unit. Raw logits have no common scale; with ``scorer="logit"`` each model's scores of a row's
candidates are divided by their sum first, as the released code does (``normalize_sum_to_one``),
when that sum is positive (left raw otherwise).

The winner then goes to every model without feeding anything again: each model keeps the
replicated row of the winning candidate, whose cache holds the winner's tokens, and the logits
after them are its next-step distribution. A model whose candidates lose ``patience`` rounds in a
row stops drafting for that prompt (``exit="draft"``) or leaves it entirely (``exit="all"``).

``reencode=True`` reproduces the released code's loop for the benchmark: no cache across rounds;
every round each model re-reads the prompt and the whole text (the same tokens) before drafting
and again before verifying.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from arfuse.adapters.base import CausalLM, MaskedKVState, RerunState
from arfuse.adapters.extend import TextExtender
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig, SegmentOptions
from arfuse.generation.results import Chunk, GenerationResult, GenerationStats, emit
from arfuse.generation.sampling import sample, transform
from arfuse.generation.state import ModelState
from arfuse.generation.text_decoder import TextDecoder

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
DRAFT, VERIFY, OUT = "draft", "verify", "out"   # a model's part in a prompt's rounds


@dataclass
class SegmentStats(GenerationStats):
    """``GenerationStats`` plus the rounds: wins per model, exits, tokens fed per model."""

    models: list[str] = field(default_factory=list)
    rounds: int = 0                                                  # rounds of the batch
    prompt_rounds: list[int] = field(default_factory=list)           # per prompt
    wins: list[int] = field(default_factory=list)                    # per model: segments won, all prompts
    prompt_wins: list[list[int]] = field(default_factory=list)       # per prompt, per model
    exits: list[list[int | None]] = field(default_factory=list)      # per prompt, per model: the round after
    #                                                                  which it exited (None: it never did)
    fed_tokens: list[int] = field(default_factory=list)              # per model, every forward pass
    draft_fed: list[int] = field(default_factory=list)               # per model, while drafting
    verify_fed: list[int] = field(default_factory=list)              # per model, verifying passes
    candidates: int = 0                                              # distinct candidates scored
    log: list[list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = field(default_factory=list)
    #    per prompt, per round: (the models that drafted, that verified, whose candidate won)

    def describe_rounds(self) -> str:
        """One line for ``--stats``."""
        n = len(self.prompt_rounds)
        wins = ", ".join(f"{m} {w}" for m, w in zip(self.models, self.wins))
        fed = ", ".join(f"{m} {f:,} ({d:,} drafting, {v:,} verifying)"
                        for m, f, d, v in zip(self.models, self.fed_tokens, self.draft_fed, self.verify_fed))
        exits = [f"prompt {i}: {self.models[m]} after round {r}" for i, row in enumerate(self.exits)
                 for m, r in enumerate(row) if r is not None]
        return (f"segments: {self.rounds} rounds" + (f" ({sum(self.prompt_rounds)} over {n} prompts)" if n > 1 else "")
                + f", {self.candidates} candidates; wins: {wins}; exits: {'; '.join(exits) or 'none'}; "
                f"tokens fed: {fed}")


def _open_char(data: bytes) -> bool:
    """Whether ``data`` ends inside a UTF-8 character (its last lead byte wants more bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:   # not a continuation byte
            want = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return want > back
    return False


class _Cand:
    """A candidate segment of one prompt: its bytes, whether it ends the text, its drafters' tokens."""

    __slots__ = ("data", "eos", "own")

    def __init__(self, data: bytes, eos: bool):
        self.data, self.eos = data, eos
        self.own: dict[int, list[int]] = {}   # model -> its own drafted tokens of it


class _Row:
    def __init__(self, index: int, prompt: str, prompt_tokens: list[list[int]], seed: int, n_models: int):
        self.index, self.prompt = index, prompt
        self.prompt_tokens = len(prompt_tokens[0])
        self.data = b""                       # the text's bytes (cut at the stop / length limit)
        self.text = ""
        self.ids: list[int] = []              # the LLM's tokens of the text
        self.new_ids: list[int] = []          # ... of its last segment
        self.emitted = 0
        self.reason: str | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self.fed = [len(p) for p in prompt_tokens]   # tokens in each model's sequence (prompt included)
        self.status = [DRAFT] * n_models
        self.losses = [0] * n_models          # rounds its candidate lost (Hedge)
        self.streak = [0] * n_models          # ... in a row (exit)
        self.wins = [0] * n_models
        self.exit_round: list[int | None] = [None] * n_models
        self.rounds = 0
        self.log: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
        self.room_hit = False                 # a model's context had no room for a draft

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt, self.text, self.ids, self.reason, self.prompt_tokens)


class SegmentDecoder(TextDecoder):
    """Segment-level ensembling of ``models`` (the LLM first; any tokenizers) under ``config``
    (max_new_tokens, sampling, stop strings, EOS, seed, truncate, bos). ``run`` yields a chunk per
    prompt per round; ``results`` and ``stats`` (``SegmentStats``) once it is exhausted.

    ``fed_ids[m][i]``: the tokens of prompt i's text that model m's cache holds after its prompt's
    (``prompt_ids[m][i]``), each fed once; ``cache_tokens[m][i]``: the tokens its KV cache held for
    prompt i when it finished (None for a cache without positions)."""

    def __init__(self, models: Sequence[CausalLM], config: GenerationConfig, *, segment_len: int = 10,
                 scorer: str = "logprob", hedge_rate: float = 0.5, patience: int | None = None,
                 exit: str = "draft", reencode: bool = False):
        self.opts = SegmentOptions(segment_len=segment_len, scorer=scorer, hedge_rate=hedge_rate,
                                   patience=patience, exit=exit)
        if not models:
            raise ArfuseError("segment-level ensembling needs at least one model")
        self.opts.check_models(len(models))
        if config.speculative is not None:
            raise ArfuseError("the segment strategy drafts and verifies segments itself: drop --speculative")
        self.models = list(models)
        self.cfg = config
        self.reencode = reencode
        o = self.opts
        rule = (f"segment-level ensembling (SpecFuse): L={o.segment_len}, scorer {o.scorer}, Hedge rate "
                f"{o.hedge_rate:g}" + (f", exit after {o.patience} lost rounds ({o.exit})" if o.patience else "")
                + (", re-encoding every round" if reencode else ""))
        K = len(self.models)
        self.stats = SegmentStats(rule=rule, mode="greedy" if config.greedy else "sampling",
                                  models=[m.info.name for m in self.models], wins=[0] * K, fed_tokens=[0] * K,
                                  draft_fed=[0] * K, verify_fed=[0] * K)
        self.results: list[GenerationResult] = []
        self.prompt_ids: list[list[list[int]]] = []
        self.fed_ids: list[list[list[int]]] = []
        self._rows: list[_Row] = []
        self._scratch = [TextExtender(m) for m in self.models]
        self._tb = [m.token_bytes() for m in self.models]

    # ---- output ---------------------------------------------------------------------------

    def row_text(self, index: int) -> str:
        """The text generated so far for prompt ``index`` (final once its last chunk came)."""
        return self._rows[index].text

    @torch.no_grad()
    def _call(self, m: int, state: ModelState, ids: torch.Tensor, mask: torch.Tensor, phase: str) -> torch.Tensor:
        """Model m's raw float32 logits (B, T, V) of the new tokens ``ids`` (``mask``: the real ones)."""
        with self._kernels():
            logits, state.past = state.model.forward_step(ids, state.past, mask)
        state.fed += 1
        n = int(mask.sum())
        s = self.stats
        s.fed_tokens[m] += n
        if phase == "draft":
            s.draft_fed[m] += n
        elif phase == "verify":
            s.verify_fed[m] += n
        if m == 0:
            s.large_passes += 1
        return logits.float()

    def _piece(self, m: int, data: bytes) -> list[int]:
        """Model m's tokens of ``data`` appended to running text (nothing held back: a draft is cut
        after whole characters and words)."""
        ext = self._scratch[m]
        ext.pending, ext.fed_ids = b"", []
        return ext.extend(data) + ext.flush()

    def _start(self, prompts: list[str]) -> tuple[list[ModelState], list[torch.Tensor], list[_Row]]:
        """Every model fed its prompts (left-padded): states, last logits (B, V) per model, rows."""
        K = len(self.models)
        self.prompt_ids = self.check_prompts(prompts)   # every length checked before any model runs
        self.fed_ids = [[[] for _ in prompts] for _ in self.models]
        self.cache_tokens: list[list[int | None]] = [[None] * len(prompts) for _ in self.models]
        states = [ModelState(model) for model in self.models]
        last = [self._call(m, states[m], *self._left_pad(self.prompt_ids[m]), "prompt")[:, -1] for m in range(K)]
        rows = [_Row(i, p, [self.prompt_ids[m][i] for m in range(K)], self.cfg.seed + i, K)
                for i, p in enumerate(prompts)]
        return states, last, rows

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, prompts: Sequence[str]) -> Iterator[Chunk]:
        start = time.perf_counter()
        prompts = list(prompts)
        if not prompts:
            raise ArfuseError("no prompts given: pass a string or a list of strings")
        K = len(self.models)
        states, last, rows = self._start(prompts)
        self._rows = rows
        self.results = []
        active = list(range(len(prompts)))
        while active:
            live = [rows[i] for i in active]
            self.stats.rounds += 1
            if self.reencode and self.stats.rounds > 1:
                self._reread(states, last, live)
            verifying = [[r.status[m] != OUT for m in range(K)] for r in live]
            drafts = [self._draft(m, states[m], last[m], live) for m in range(K)]
            drafted = [[drafts[m][j] is not None for m in range(K)] for j in range(len(live))]
            cands = [self._candidates(j, drafts) for j in range(len(live))]
            if self.reencode:
                self._reread(states, last, live)
            winners, toks = self._verify(states, last, live, cands)
            keep = []
            for j, row in enumerate(live):
                self._commit(row, cands[j], winners[j], drafted[j], [t[j] for t in toks])
                row.log.append((tuple(m for m in range(K) if drafted[j][m]),
                                tuple(m for m in range(K) if verifying[j][m]),
                                () if winners[j] is None else tuple(sorted(cands[j][winners[j]].own))))
                if row.reason is not None:   # what each model's cache holds for it (tests: nothing twice)
                    for m, st in enumerate(states):
                        if isinstance(st.past, MaskedKVState):
                            self.cache_tokens[m][row.index] = int(st.past.next_pos[j])
                chunk = emit(row, self.cfg.stop, row.new_ids)   # the LLM's tokens of its last segment
                if chunk is not None:
                    yield chunk
                if row.reason is None:
                    keep.append(j)
            if keep and len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long)
                for st in states:
                    st.select(sel)
                last = [x[sel.to(x.device)] for x in last]
            active = [active[j] for j in keep]
        self._finish(start, rows)

    def _finish(self, start: float, rows: list[_Row]) -> None:
        s = self.stats
        s.seconds = time.perf_counter() - start
        s.new_tokens = sum(len(r.ids) for r in rows)
        s.cycles = s.rounds
        s.prompt_rounds = [r.rounds for r in rows]
        s.prompt_wins = [list(r.wins) for r in rows]
        s.exits = [list(r.exit_round) for r in rows]
        s.log = [list(r.log) for r in rows]
        s.wins = [sum(r.wins[m] for r in rows) for m in range(len(self.models))]
        self.results = [r.result() for r in rows]

    def _reread(self, states: list[ModelState], last: list[torch.Tensor], rows: list[_Row]) -> None:
        """``reencode``: fresh states, each model reading every row's prompt and text again."""
        for m in range(len(self.models)):
            seqs = [self.prompt_ids[m][r.index] + self.fed_ids[m][r.index] if r.status[m] != OUT else []
                    for r in rows]
            if any(seqs):   # a model that has left every row keeps its (unused) state
                states[m] = ModelState(self.models[m])
                last[m] = self._call(m, states[m], *self._left_pad(seqs), "reread")[:, -1]

    # ---- drafting ----------------------------------------------------------------------------
    def _pick(self, lp: torch.Tensor, rows: list[_Row], live: list[int]) -> dict[int, int]:
        """The next draft token of each live row, from its log-probs ``lp`` (B, V)."""
        cfg = self.cfg
        if cfg.greedy:
            picks = lp[live].argmax(-1).tolist()
        else:
            logp = transform(lp[live], cfg.temperature, cfg.top_k, cfg.top_p)
            u = torch.stack([torch.rand(1, generator=rows[b].gen, dtype=torch.float64)[0] for b in live])
            picks = sample(logp, u).tolist()
        return dict(zip(live, picks))

    def _draft(self, m: int, state: ModelState, last: torch.Tensor,
               rows: list[_Row]) -> list[tuple[list[int], bool] | None]:
        """Model m's draft for each row it drafts for: (tokens, ends with EOS), None elsewhere. Its
        state is rolled back to the prefix afterwards."""
        model, cfg, L = self.models[m], self.cfg, self.opts.segment_len
        tb = self._tb[m]
        limit = model.info.max_length
        caps = []
        for r in rows:
            cap = L if limit is None else min(L, limit - r.fed[m])
            if r.status[m] == DRAFT and cap < 1:
                r.room_hit = True
            caps.append(cap if r.status[m] == DRAFT else 0)
        live = [b for b, c in enumerate(caps) if c >= 1]
        out: list[tuple[list[int], bool] | None] = [([], False) if c >= 1 else None for c in caps]
        if not live:
            return out
        eos_id = model.eos_id
        logits, n_fed = last, 0
        while live:
            lp = torch.log_softmax(logits, dim=-1)
            if not cfg.stop_at_eos and eos_id is not None:
                lp[:, eos_id] = -math.inf
            picks = self._pick(lp, rows, live)
            ids = torch.zeros(len(rows), 1, dtype=torch.long)
            mask = torch.zeros(len(rows), 1, dtype=torch.bool)
            still = []
            for b in live:
                t = picks[b]
                if cfg.stop_at_eos and t == eos_id:
                    out[b] = (out[b][0], True)
                    continue
                if tb[t] is None:   # a special token: no text any other model could read; the draft ends before it
                    continue
                out[b][0].append(t)
                if len(out[b][0]) < caps[b]:
                    still.append(b)
                    ids[b, 0], mask[b, 0] = t, True
            live = still
            if live:
                logits = self._call(m, state, ids, mask, "draft")[:, -1]
                n_fed += 1
        if n_fed:
            state.rollback(n_fed, torch.zeros(len(rows), dtype=torch.long))
        for b, d in enumerate(out):
            if d is not None and not d[1] and len(d[0]) == L:
                out[b] = (d[0][:self._cut(d[0], tb)], False)
        return out

    @staticmethod
    def _cut(toks: list[int], tb: list[bytes | None]) -> int:
        """How many tokens of a full-length draft to keep: up to its last word end (the last point
        where the rest starts with whitespace), else its longest prefix that does not end inside a
        UTF-8 character, else all of it."""
        for k in range(len(toks) - 1, 0, -1):
            b = tb[toks[k]]
            if b and b[0] in WHITESPACE:
                return k
        data = b"".join(tb[t] for t in toks)
        for k in range(len(toks), 0, -1):
            if not _open_char(data):
                return k
            data = data[:len(data) - len(tb[toks[k - 1]])]
        return len(toks)

    def _candidates(self, j: int, drafts: list[list[tuple[list[int], bool] | None]]) -> list[_Cand]:
        """Row j's distinct candidates, in the order of their first drafter (empty drafts dropped)."""
        cands: dict[tuple[bytes, bool], _Cand] = {}
        for m, per_row in enumerate(drafts):
            d = per_row[j]
            if d is None:
                continue
            toks, eos = d
            data = b"".join(self._tb[m][t] for t in toks)
            if not data and not eos:
                continue
            c = cands.setdefault((data, eos), _Cand(data, eos))
            c.own[m] = toks
        return list(cands.values())

    # ---- verification ------------------------------------------------------------------------
    def _tokens(self, m: int, cand: _Cand) -> tuple[list[int], list[int]]:
        """Model m's tokens of a candidate: those to feed, and those to score (an EOS ending included)."""
        feed = cand.own[m] if m in cand.own else self._piece(m, cand.data)
        eos = self.models[m].eos_id
        return feed, (feed + [eos] if cand.eos and eos is not None else feed)

    def _score(self, m: int, state: ModelState, last: torch.Tensor,
               toks: list[list[tuple[list[int], list[int]]] | None],
               ) -> tuple[list[list[float] | None], list[int], torch.Tensor]:
        """Model m scores each row's candidates in one pass over replicated rows. ``toks[j]``: row j's
        candidates as (tokens to feed, tokens to score), None where m does not verify (one replica,
        fed nothing). Returns the scores per row, each row's first replica, and the logits (N, V)
        after each replica's tokens; ``state`` now holds the replicas."""
        rep, seqs, scored, first = [], [], [], []
        for j, cs in enumerate(toks):
            first.append(len(rep))
            for feed, sc in (cs or [([], [])]):   # a row m does not verify: one replica, fed nothing
                rep.append(j)
                seqs.append(feed)
                scored.append(sc)
        sel = torch.tensor(rep, dtype=torch.long)
        state.select(sel)
        if isinstance(state.past, RerunState):   # its repeated rows would share one token list
            state.past.seqs = [list(q) for q in state.past.seqs]
        prev = last[sel.to(last.device)]                         # (N, V): after each prefix
        N, T = len(rep), max(len(s) for s in seqs)
        if T:
            ids = torch.zeros(N, T, dtype=torch.long)
            mask = torch.zeros(N, T, dtype=torch.bool)
            for b, s in enumerate(seqs):                         # right padding: masked, never attended to
                if s:
                    ids[b, :len(s)] = torch.tensor(s)
                    mask[b, :len(s)] = True
            full = torch.cat([prev[:, None], self._call(m, state, ids, mask, "verify")], 1)   # (N, T + 1, V)
        else:
            full = prev[:, None]
        S = max(1, max(len(s) for s in scored))
        tgt = torch.zeros(N, S, dtype=torch.long)
        valid = torch.zeros(N, S, dtype=torch.bool)
        for b, s in enumerate(scored):
            if s:
                tgt[b, :len(s)] = torch.tensor(s)
                valid[b, :len(s)] = True
        x = full[:, :S]
        dev = x.device
        g = x.gather(-1, tgt.to(dev)[..., None]).squeeze(-1)     # (N, S): each token's raw logit
        if self.opts.scorer != "logit":
            g = g - torch.logsumexp(x, dim=-1)
        v = valid.to(dev)
        if self.opts.scorer == "byte":   # per byte of the candidate: one unit whatever the tokenizer
            tb = self.models[m].token_bytes()
            per = torch.tensor([max(1, sum(len(tb[t] or b"") for t in s)) for s in scored], dtype=g.dtype)
        else:
            per = v.sum(1).clamp(min=1).to(g.dtype).cpu()
        mean = (torch.where(v, g, torch.zeros_like(g)).sum(1).cpu() / per).tolist()
        after = full[torch.arange(N, device=dev), torch.tensor([len(s) for s in seqs], device=dev)]  # (N, V)
        scores = [None if cs is None else mean[first[j]:first[j] + len(cs)] for j, cs in enumerate(toks)]
        return scores, first, after

    def _verify(self, states: list[ModelState], last: list[torch.Tensor], rows: list[_Row],
                cands: list[list[_Cand]]) -> tuple[list[int | None], list[list[list[int] | None]]]:
        """Score every candidate by every verifying model, choose each row's winner, and leave each
        model's state and ``last`` at the winner (its cache already holds the winner's tokens).
        Returns the winners (None: no candidate) and each model's fed tokens of them per row."""
        K = len(self.models)
        toks = [[None if r.status[m] == OUT else [self._tokens(m, c) for c in cands[j]] for j, r in enumerate(rows)]
                for m in range(K)]
        for j, r in enumerate(rows):   # a candidate that does not fit a verifier's context is dropped
            fits = [all(toks[m][j] is None or self.models[m].info.max_length is None
                        or r.fed[m] + len(toks[m][j][c][0]) <= self.models[m].info.max_length for m in range(K))
                    for c in range(len(cands[j]))]
            if not all(fits):
                r.room_hit = True
                cands[j] = [c for c, ok in zip(cands[j], fits) if ok]
                for m in range(K):
                    if toks[m][j] is not None:
                        toks[m][j] = [t for t, ok in zip(toks[m][j], fits) if ok]
        self.stats.candidates += sum(len(c) for c in cands)
        scores, firsts, afters = [], [], []
        for m in range(K):
            if all(t is None for t in toks[m]):   # m has left every row: its state is not needed any more
                scores.append([None] * len(rows)), firsts.append(None), afters.append(None)
                continue
            s, f, a = self._score(m, states[m], last[m], toks[m])
            scores.append(s), firsts.append(f), afters.append(a)
        winners = [self._rank(r, [scores[m][j] for m in range(K)]) if cands[j] else None
                   for j, r in enumerate(rows)]
        fed: list[list[list[int] | None]] = []
        for m in range(K):
            if firsts[m] is None:
                fed.append([None] * len(rows))
                continue
            pick = [firsts[m][j] + (w if toks[m][j] is not None and w is not None else 0)
                    for j, w in enumerate(winners)]
            sel = torch.tensor(pick, dtype=torch.long)
            states[m].select(sel)
            last[m] = afters[m][sel.to(afters[m].device)]
            fed.append([toks[m][j][w][0] if toks[m][j] is not None and w is not None else None
                        for j, w in enumerate(winners)])
        return winners, fed

    def _rank(self, row: _Row, scores: list[list[float] | None]) -> int:
        """The winning candidate: the highest sum of Hedge-weighted scores (the first on a tie)."""
        ms = [m for m, s in enumerate(scores) if s is not None]
        eta = self.opts.hedge_rate
        low = min(row.losses[m] for m in ms)
        w = [math.exp(-eta * (row.losses[m] - low)) for m in ms]
        total = sum(w)
        n = len(scores[ms[0]])
        fused = [0.0] * n
        for wm, m in zip(w, ms):
            s = scores[m]
            if self.opts.scorer == "logit":   # the released code's per-verifier normalisation
                z = sum(s)
                if z > 0:
                    s = [x / z for x in s]
            for c in range(n):
                fused[c] += wm / total * s[c]
        return max(range(n), key=lambda c: (fused[c], -c))

    # ---- committing a round ------------------------------------------------------------------
    def _commit(self, row: _Row, cands: list[_Cand], winner: int | None, drafted: list[bool],
                fed: list[list[int] | None]) -> None:
        """Append the winner to the row's text and every verifier's record; update the Hedge losses,
        the exits and the stop reason."""
        row.rounds += 1
        row.new_ids = []
        if winner is None:
            row.reason = "length" if row.room_hit else "eos"
            return
        cand = cands[winner]
        K = len(self.models)
        for m in range(K):
            if fed[m] is not None:
                self.fed_ids[m][row.index].extend(fed[m])
                row.fed[m] += len(fed[m])
            if not drafted[m]:
                continue
            if m in cand.own:
                row.wins[m] += 1
                row.streak[m] = 0
            else:
                row.losses[m] += 1
                row.streak[m] += 1
                p = self.opts.patience
                if p is not None and row.streak[m] >= p:
                    row.status[m] = VERIFY if self.opts.exit == "draft" else OUT
                    row.exit_round[m] = row.rounds
        new = fed[0] if fed[0] is not None else self._piece(0, cand.data)
        data = cand.data
        room = self.cfg.max_new_tokens - len(row.ids)
        if len(new) > room:   # the segment overshoots max_new_tokens: cut it at the LLM's limit
            new = new[:room]
            data = b"".join(self._tb[0][t] or b"" for t in new)
        row.ids.extend(new)
        row.new_ids = new
        row.data += data
        row.text = row.data.decode("utf-8", errors="replace")   # as the tokenizers decode it
        hits = [(i, s) for s in self.cfg.stop if (i := row.text.find(s)) >= 0]
        if hits:
            at, s = min(hits)
            row.text = row.text[:at]
            end = len((row.text + s).encode())
            n, got = 0, 0
            while n < len(row.ids) and got < end:   # the LLM's tokens up to the one that completes the stop
                got += len(self._tb[0][row.ids[n]] or b"")
                n += 1
            del row.ids[n:]
            row.reason = "stop"
        elif len(row.ids) >= self.cfg.max_new_tokens:
            row.reason = "length"
        elif cand.eos:
            row.reason = "eos"

    # ---- scoring given segments (tests, analysis) -------------------------------------------
    def score_segments(self, prompts: Sequence[str], segments: Sequence[Sequence[str]]) -> list[list[list[float]]]:
        """Every model's score (the scorer's mean over its tokens) of each prompt's candidate
        segments, all of a model's in one batched pass over its cached prompts: ``[m][i][c]``."""
        prompts = list(prompts)
        if len(segments) != len(prompts) or any(not s for s in segments):
            raise ArfuseError("give one non-empty list of candidate segments per prompt")
        states, last, _ = self._start(prompts)
        cands = [[_Cand(s.encode(), False) for s in segs] for segs in segments]
        out = []
        for m in range(len(self.models)):
            toks = [[self._tokens(m, c) for c in cs] for cs in cands]
            out.append(self._score(m, states[m], last[m], toks)[0])
        return out
