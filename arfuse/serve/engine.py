"""Continuous batching over the fused decoder: one scheduler thread owns the models.

Each iteration of the scheduler (1) drops the rows whose client left, (2) prefills the requests
that arrived since the last step, as one left-padded batch, and joins their step states to the
running batch (``StepState.concat``: the shorter cache is padded on the left, every row keeps its
own positions), (3) runs one fused step for every active row: each model is fed the rows' last
tokens once, P = rule(log-probs) is formed once for the batch, and each row picks its next token
with its own settings (temperature, top-p, top-k, seed, stop strings, max tokens), (4) sends every
row's new text to its request and drops the rows that finished (``StepState.select``). So requests
join and leave the batch at every step, and a row's tokens are those of ``arfuse.generate`` with
the same prompt, settings and seed, alone: its random stream is its own (``Row.gen``, seeded with
the request's seed) and padding changes nothing.

Models whose states cannot join (``StepState.concat``: llama2.c, RNN checkpoints) are
refused when the engine is made, with the fix (``--max-batch 1``), not at the first join under load.
A request cancelled while it waits leaves the queue at once; ``max_queue`` counts the requests
waiting beyond the free rows.

Plain fused steps only: speculative decoding is not used here (with many rows sharing a step, one
LLM pass per token already serves them all; drafting per row would need per-row draft lengths).
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig
from arfuse.generation.cycles import Rule
from arfuse.generation.decode import Decoder
from arfuse.generation.results import Row, commit
from arfuse.generation.sampling import sample, transform
from arfuse.generation.state import ModelState, left_padded

CANCELLED = "cancelled"   # the finish reason of a row the server ended (client gone, shutdown)


class QueueFull(Exception):
    """The waiting queue is full (HTTP 503)."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class TokenLogprob:
    """The fused distribution's log-probability of a chosen token and, where asked, its top tokens."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """New text of one request: ``token_ids`` and their ``logprobs`` committed this step; the last
    event of a request has ``finish_reason`` ("stop", "eos", "length", "cancelled" or "error")."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    error: str | None = None


class Request:
    """One prompt to decode: its settings, every model's token ids, where its events go."""

    _ids = itertools.count()

    def __init__(self, prompt: str, cfg: GenerationConfig, ids: list[list[int]], on_event: Callable[[Event], None],
                 top_logprobs: int | None = None):
        self.id = next(self._ids)
        self.prompt, self.cfg, self.ids, self.on_event = prompt, cfg, ids, on_event
        self.top_logprobs = top_logprobs      # None: no log-probs; 0: the chosen token's only; k: and the top k
        self.row = Row(0, prompt, ids[0], cfg.seed)
        self.cancelled = threading.Event()
        self.done = False
        self.submitted = time.monotonic()
        self.logprobs: list[TokenLogprob] = []

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids[0])

    def send(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.done = True
        try:
            self.on_event(event)
        except RuntimeError:  # the receiving event loop is gone (shutdown): nobody is listening
            pass


@dataclass
class EngineStats:
    """Counts since start, for /health and the benchmark."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    tokens: int = 0
    row_steps: int = 0          # sum over steps of the batch size (mean batch = row_steps / steps)
    max_batch_seen: int = 0
    joins: int = 0              # prefilled cohorts joined into a running batch

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch"] = round(self.row_steps / self.steps, 3) if self.steps else 0.0
        return d


class Engine:
    """The scheduler: ``submit`` requests from any thread; one thread decodes them all.

    ``lock`` is held around each scheduler iteration (a caller that holds it pauses decoding between
    steps); ``tok_lock`` around every use of the tokenizer (a Rust tokenizer may not be used from two
    threads at once)."""

    def __init__(self, models: Sequence[CausalLM], rule: Rule, *, max_batch: int = 32, max_queue: int = 256,
                 fast_kernels: bool = True):
        if max_batch < 1:
            raise ArfuseError(f"max batch {max_batch} must be >= 1 (rows decoded together, --max-batch)")
        if max_queue < 0:
            raise ArfuseError(f"max queue {max_queue} must be >= 0 (requests waiting for a row, --max-queue)")
        if not getattr(rule, "same_vocab", True):
            raise ArfuseError("the server fuses models that share one tokenizer (a token-level rule such as linear or "
                              "cosine): for models with different tokenizers use `arfuse generate --rule union`")
        self.models, self.rule = list(models), rule
        self.tok = self.models[0]
        self.max_batch, self.max_queue = max_batch, max_queue
        self.fast_kernels = fast_kernels
        self.lock = threading.Lock()
        self.tok_lock = threading.Lock()
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._states: list[ModelState] = []
        self._last = torch.zeros(0, dtype=torch.long)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self._kernels = [m.fast_kernels() for m in {id(m): m for m in self.models}.values()] if fast_kernels else []
        if max_batch > 1:
            self._check_joinable()

    def _check_joinable(self) -> None:
        """Continuous batching joins newly prefilled rows to the running batch (``StepState.concat``):
        a model whose state cannot (llama2.c, RNN checkpoints, a transformers cache that is
        not a plain DynamicCache) fails here, at start, with the fix, not at the first join under load."""
        for m in {id(m): m for m in self.models}.values():
            ids = torch.tensor([[m.bos_id if m.bos_id is not None else 0]], dtype=torch.long)
            a, b = ModelState(m), ModelState(m)
            a.feed(ids)
            b.feed(ids)
            try:
                a.concat(b, 1, 1)
                a.feed(ids.repeat(2, 1))   # a step after the join (an actor's state joins with its next step)
            except (ArfuseError, NotImplementedError, ValueError, TypeError) as e:
                kind = type(a.past).__name__ if a.past is not None else "none"
                why = f" ({e})" if "--max-batch 1" not in str(e) else ""   # the backend's own reason, if new
                raise ArfuseError(f"{m.info.name} ({m.info.kind}) keeps a decoding state ({kind}) that cannot join a "
                                  f"running batch{why}, which continuous batching needs to let requests join as they "
                                  "arrive: serve it with --max-batch 1 (one request at a time), or use a "
                                  "transformers model") from None

    # ---- from the HTTP side ----------------------------------------------------------------
    def check(self, prompt: str, cfg: GenerationConfig) -> list[list[int]]:
        """Every model's token ids of ``prompt``, checked against the contexts (ArfuseError if too long)."""
        with self.tok_lock:
            return [seqs[0] for seqs in Decoder(self.models, self.rule, cfg).check_prompts([prompt])]

    def submit(self, req: Request) -> None:
        """Queue ``req``; raises QueueFull when ``max_queue`` requests already wait, ShuttingDown while draining."""
        with self._cv:
            if self._stopping or self._drain_deadline is not None:
                self.stats.rejected += 1
                raise ShuttingDown("the server is shutting down")
            free = max(0, self.max_batch - len(self._active))   # these join at the next step: they do not wait
            if len(self._pending) >= self.max_queue + free:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending) - free} requests are waiting for a free row already (the "
                                f"server's --max-queue {self.max_queue})")
            self._pending.append(req)
            self.stats.submitted += 1
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client left: ``req`` leaves the waiting queue at once (its place there is free for
        another request), or its row is dropped before the next step."""
        if req.done:
            return
        req.cancelled.set()
        with self._cv:
            try:
                self._pending.remove(req)
            except ValueError:   # not waiting: a row, dropped by the scheduler
                pass
            else:
                self._end(req, CANCELLED)
            self._cv.notify()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="arfuse-scheduler", daemon=True)
            self._thread.start()

    def drain(self, seconds: float) -> None:
        """Take no new requests; finish the ones in flight within ``seconds``, then cancel the rest."""
        with self._cv:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + seconds
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is left and end the scheduler thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self._active and not self._pending

    # ---- the scheduler ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self._active:
                    self._cv.wait(0.5)
                if self._stopping and self.idle:
                    return
                stop_all = self._stopping or (self._drain_deadline is not None
                                              and time.monotonic() >= self._drain_deadline)
            with self.lock:
                try:
                    if stop_all:
                        self._cancel_all()
                    else:
                        self._iteration()
                except Exception as e:  # noqa: BLE001 - a failed step ends its requests, not the server
                    self._fail_all(e)

    def _iteration(self) -> None:
        gone = [j for j, r in enumerate(self._active) if r.cancelled.is_set()]
        if gone:
            self._drop(gone, CANCELLED)
        room = self.max_batch - len(self._active)
        cohort: list[Request] = []
        with self._cv:
            while self._pending and len(cohort) < room:
                r = self._pending.popleft()
                if r.cancelled.is_set():
                    self._end(r, CANCELLED)
                else:
                    cohort.append(r)
        if cohort:
            try:
                states = self._prefill(cohort)
            except Exception as e:  # noqa: BLE001 - the running batch is untouched: only the cohort fails
                for r in cohort:
                    self._end(r, "error", f"{type(e).__name__}: {e}")
            else:
                try:
                    self._join(cohort, states)
                except Exception as e:
                    for r in cohort:
                        self._end(r, "error", f"{type(e).__name__}: {e}")
                    raise   # the running states may be half joined: every row fails (``_fail_all``)
        if self._active:
            self._step()

    def _kernels_on(self):
        import contextlib

        stack = contextlib.ExitStack()
        for k in self._kernels:
            stack.enter_context(k.active())
        return stack

    def _prefill(self, cohort: list[Request]) -> list[ModelState]:
        """Every model's state after the new requests' prompts but their last tokens, left-padded."""
        states = [ModelState(m) for m in self.models]
        with self._kernels_on():
            for i, st in enumerate(states):
                padded = left_padded([r.ids[i] for r in cohort])
                if padded is not None:
                    st.feed(*padded)
        return states

    def _join(self, cohort: list[Request], states: list[ModelState]) -> None:
        """Join the prefilled ``states`` of ``cohort`` to the running batch."""
        last = torch.tensor([r.ids[0][-1] for r in cohort], dtype=torch.long)
        if not self._active:
            self._states, self._last = states, last
        else:
            for mine, new in zip(self._states, states):
                mine.concat(new, len(self._active), len(cohort))
            self._last = torch.cat([self._last, last])
            self.stats.joins += 1
        self._active.extend(cohort)

    def _step(self) -> None:
        """One fused step for every active row; commit each row's token with its own stop rules."""
        B = len(self._active)
        with self._kernels_on():
            logps = [st.feed(self._last[:, None])[:, 0] for st in self._states]  # each (B, V)
        fused = self.rule(logps)  # (B, V): P, the distribution every row's tokens follow
        greedy_pick = fused.argmax(-1).cpu()
        tokens = []
        for b, req in enumerate(self._active):
            cfg = req.cfg
            if cfg.greedy:
                tokens.append(int(greedy_pick[b]))
            else:  # the draw ``generate`` makes for this row in a plain cycle: one uniform of its own stream
                u = torch.rand(1, generator=req.row.gen, dtype=torch.float64)
                target = transform(fused[b:b + 1], cfg.temperature, cfg.top_k, cfg.top_p)
                tokens.append(int(sample(target, u)[0]))
        s = self.stats
        s.steps += 1
        s.row_steps += B
        s.max_batch_seen = max(s.max_batch_seen, B)
        keep, finished = [], []
        with self.tok_lock:
            for b, (req, t) in enumerate(zip(self._active, tokens)):
                before = len(req.row.ids)
                chunk = commit(req.row, [t], req.cfg, self.tok)
                new = len(req.row.ids) - before
                s.tokens += new
                lps = []
                if req.top_logprobs is not None and new:
                    lps = [self._logprob(fused[b], t, req.top_logprobs)]
                    req.logprobs.extend(lps)
                if chunk is not None:
                    req.send(Event(chunk.text, chunk.token_ids, lps, _reason(chunk.finish_reason)))
                if req.row.reason is None:
                    keep.append(b)
                else:
                    finished.append(req)
        s.finished += len(finished)
        if len(keep) < B:
            self._select(keep)
        self._last = torch.tensor([tokens[b] for b in keep], dtype=torch.long) if keep else self._last[:0]

    @staticmethod
    def _logprob(fused_row: torch.Tensor, t: int, k: int) -> TokenLogprob:
        top = []
        if k:
            v, i = torch.topk(fused_row, k)
            top = list(zip(i.tolist(), v.tolist()))
        return TokenLogprob(t, float(fused_row[t]), top)

    def _select(self, keep: list[int]) -> None:
        self._active = [self._active[j] for j in keep]
        if not keep:
            self._states, self._last = [], torch.zeros(0, dtype=torch.long)
            return
        sel = torch.tensor(keep, dtype=torch.long)
        for st in self._states:
            st.select(sel)

    def _drop(self, rows: list[int], reason: str) -> None:
        for j in rows:
            self._end(self._active[j], reason)
        keep = [j for j in range(len(self._active)) if j not in set(rows)]
        self._last = self._last[torch.tensor(keep, dtype=torch.long)] if keep else self._last[:0]
        self._select(keep)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        with self._stats_lock:   # the scheduler and ``cancel`` (the HTTP side) both end requests
            if reason == CANCELLED:
                self.stats.cancelled += 1
            elif reason == "error":
                self.stats.failed += 1
        req.send(Event("", [], [], reason, error))

    def _cancel_all(self) -> None:
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
        for r in pending:
            self._end(r, CANCELLED)
        if self._active:
            self._drop(list(range(len(self._active))), CANCELLED)

    def _fail_all(self, e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}"
        for r in self._active:
            if not r.done:
                self._end(r, "error", msg)
        self._active, self._states, self._last = [], [], torch.zeros(0, dtype=torch.long)


def _reason(r: str | None) -> str | None:
    """Generation's finish reasons as OpenAI's: an EOS token or a stop string is "stop"."""
    return None if r is None else ("stop" if r in ("eos", "stop") else r)
