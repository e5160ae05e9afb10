"""Scoring past one process: the windows of a data set sharded over a pool of Ray actors.

``score()`` cuts the windows of a data set into cache chunks (about 16k targets each, fixed by
the plan alone: the unit of resumption). With workers, the chunks still to score are cut further
into *pieces* of whole forward batches, so that two workers share even a one-chunk data set; a
pool of Ray actors (each loads its model once, with its own ``num_cpus``/``num_gpus``) scores the
pieces, and the driver writes each chunk, once all its pieces are back, through the ordinary
cache (atomic, checksummed). A piece holds whole batches of its chunk's batch plan in their
order, so every window is computed in exactly the batch it has in a single-process run: the
records are bit-identical (on the same hardware and library build).

Faults. A worker that dies (``kill -9``, an out-of-memory kill, a lost node) fails its piece;
the driver says so on standard error, starts a replacement actor and schedules the piece again
(at most ``max_retries`` times per piece). A piece's records are used once, when its chunk is
assembled, so nothing is lost and nothing is written twice. A driver that dies loses the pieces
of unfinished chunks only: the rerun resumes from the chunks in the cache (``resume_note``).

Ray is imported only here, and only when workers are asked for: ``arfuse`` without
``--workers`` never imports it.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from arfuse.adapters.actor import lost_worker_errors, worker_message
from arfuse.errors import ArfuseError
from arfuse.scoring.records import TokenRecords

PIECES_PER_WORKER = 4     # pieces per worker over the work left, so that workers finish together


@dataclass
class ShardReport:
    """What a pool did, for the caller and the tests: pieces scored, retries, its actors."""

    pieces: int = 0
    retries: int = 0
    replaced: int = 0
    actor_names: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)


@dataclass
class Workers:
    """Score with ``n`` Ray actors: on a running cluster at ``address`` ("auto", "HOST:PORT",
    "ray://HOST:10001"), or a local one started here when it is None. Each actor takes
    ``num_cpus`` CPUs (and as many torch threads) and ``num_gpus`` GPUs (None: one per actor when
    the model is on CUDA, none otherwise)."""

    n: int
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_retries: int = 3
    report: ShardReport = field(default_factory=ShardReport)

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ArfuseError(f"--workers {self.n!r} must be an integer >= 1 (or leave --workers out to score "
                              "in this process)")
        if not self.num_cpus > 0:
            raise ArfuseError(f"--worker-cpus {self.num_cpus} must be > 0, e.g. --worker-cpus 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ArfuseError(f"--worker-gpus {self.num_gpus} must be >= 0")
        if self.max_retries < 0:
            raise ArfuseError(f"max_retries {self.max_retries} must be >= 0")


# ---- the process-wide setting of the command line (score/eval/task --workers) -------------------
_ACTIVE: list[tuple[Workers, dict]] = []   # (workers, {"pool": its pool once made}) of the open scale_out contexts


@contextlib.contextmanager
def scale_out(workers: Workers | None) -> Iterator[Workers | None]:
    """Inside, every ``score()`` without its own ``workers`` uses ``workers`` (None: no change);
    one pool of actors is made on first use and kept until the context closes: each actor loads
    each model it is asked to score once, and keeps it."""
    if workers is None:
        yield None
        return
    holder: dict = {}
    _ACTIVE.append((workers, holder))
    try:
        yield workers
    finally:
        _ACTIVE.pop()
        if "pool" in holder:
            holder["pool"].close()


def active() -> Workers | None:
    """The workers of the innermost open ``scale_out`` context, or None."""
    return _ACTIVE[-1][0] if _ACTIVE else None


# ---- one piece of work, scored the same in any process ------------------------------------------
def score_items(model, docs, items, k: int, batch_size: int) -> TokenRecords:
    """Records of the targets of ``items`` ((doc, Window) pairs), in order: through the model's
    forward pass (``scorer._score_windows``), or through an engine that returns log-probs itself
    (a model with ``window_logprobs``, the vLLM backend)."""
    engine = getattr(model, "window_logprobs", None)
    if engine is None:
        from arfuse.scoring.scorer import _score_windows

        return _score_windows(model, docs, items, k, batch_size)
    outs = engine([docs[d].seq[w.ctx_start:w.tgt_end] for d, w in items], [w.n_targets for _, w in items], k)
    parts = []
    for (d, w), (lpt, tid, tlp) in zip(items, outs):
        if not (np.isfinite(lpt).all() and np.isfinite(tlp).all()):
            raise ArfuseError(f"{model.info.name} produced NaN or inf log-probabilities in document {d}, targets "
                              f"{w.tgt_start}-{w.tgt_end}: check its weights and dtype (try --dtype float32)")
        doc, sl = docs[d], slice(w.tgt_start, w.tgt_end)
        parts.append(TokenRecords(
            doc=np.full(w.n_targets, d, np.int32), pos=np.arange(w.tgt_start, w.tgt_end, dtype=np.int32),
            target=doc.seq[sl].astype(np.int32), logp=np.asarray(lpt, np.float32),
            topk_ids=np.asarray(tid, np.int32), topk_logp=np.asarray(tlp, np.float32),
            nbytes=doc.nbytes[sl], nchars=doc.nchars[sl], nwords=doc.nwords[sl]))
    return TokenRecords.concat(parts)


def batch_plan(items, batch_size: int) -> list[list[int]]:
    """The batches ``scorer._score_windows`` makes of ``items``: indices grouped by input length in
    order of first appearance, each group cut into runs of ``batch_size``."""
    by_len: dict[int, list[int]] = {}
    for j, (_, w) in enumerate(items):
        by_len.setdefault(w.input_len, []).append(j)
    return [idxs[b:b + batch_size] for idxs in by_len.values() for b in range(0, len(idxs), batch_size)]


@dataclass
class Piece:
    """Windows ``idx`` (indices into chunk ``chunk``'s items, increasing) made of whole batches of
    the chunk's batch plan, so that scoring them alone forms exactly those batches again."""

    chunk: int
    idx: list[int]
    n_targets: int
    attempts: int = 0


def plan_pieces(chunks, todo: list[int], batch_size: int, target: int) -> list[Piece]:
    """Each chunk of ``todo`` cut into pieces of whole batches holding about ``target`` targets.

    Within a length group only the last batch can be short, and a piece takes consecutive batches
    of the plan; so the piece's windows, in chunk order, regroup into the same batches."""
    out = []
    for i in todo:
        items = chunks[i]
        cur: list[int] = []
        n = 0
        for batch in batch_plan(items, batch_size):
            cur.extend(batch)
            n += sum(items[j][1].n_targets for j in batch)
            if n >= target:
                out.append(Piece(i, sorted(cur), n))
                cur, n = [], 0
        if cur:
            out.append(Piece(i, sorted(cur), n))
    return out


def score_chunks(model, docs, chunks, todo: list[int], k: int, batch_size: int, advance: Callable[[int], None],
                 *, workers: Workers | int | None = None) -> Iterator[tuple[int, TokenRecords]]:
    """``(i, records)`` of each chunk ``i`` of ``todo``, as each is finished; ``advance(n)`` as
    ``n`` targets are scored. Without ``workers``, in this process, in order."""
    if workers is None:
        for i in todo:
            rec = score_items(model, docs, chunks[i], k, batch_size)
            advance(len(rec))
            yield i, rec
        return
    if isinstance(workers, int):
        workers = Workers(workers)
    holder = _ACTIVE[-1][1] if _ACTIVE and _ACTIVE[-1][0] is workers else None
    if holder is None:
        pool = ShardPool(workers, model)
    else:
        pool = holder.get("pool") or holder.setdefault("pool", ShardPool(workers, model))
    try:
        yield from pool.run(model, docs, chunks, todo, k, batch_size, advance)
    finally:
        if holder is None:
            pool.close()


# ---- the pool ---------------------------------------------------------------------------------
def _identity(model) -> dict:
    return {"identity": model.info.identity, "tokenizer": model.tokenizer_fingerprint(), "dtype": str(model.dtype),
            "vocab_size": model.info.vocab_size}


class _ScoreWorker:
    """A Ray actor that scores pieces of windows with the models it is sent, each loaded once."""

    def __init__(self, threads: int, env: dict):
        os.environ.update(env)
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads, self.env = threads, env
        self.models: dict[str, object] = {}
        self.docs: dict[str, object] = {}

    def ready(self) -> int:
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def score(self, mkey: str, source_box: list, docs_box: list, items, k: int, batch_size: int):
        """The piece's records as arrays, and the model's identity when this call loaded it (else None)."""
        import ray

        from arfuse.adapters.actor import load_source

        loaded = None
        if mkey not in self.models:
            kind, source = source_box
            self.models[mkey] = load_source(kind, ray.get(source) if kind == "object" else source, self.threads,
                                            self.env)
            loaded = _identity(self.models[mkey])
        ref = docs_box[0]
        key = ref.hex()
        if key not in self.docs:
            self.docs = {key: ray.get(ref)}   # one data set at a time
        return score_items(self.models[mkey], self.docs[key], items, k, batch_size).arrays(), loaded


class ShardPool:
    """``workers.n`` actors that score pieces of chunks with the models they are sent (each loaded
    once per actor), retrying the pieces of lost actors. GPUs per actor: ``workers.num_gpus``, or
    one when ``model`` (the first it scores) is on CUDA."""

    def __init__(self, workers: Workers, model):
        from arfuse.adapters.actor import connect, forwarded_env

        self.ray = ray = connect(workers.address, "--workers")
        self.workers = workers
        self.report = workers.report
        self.models: dict[int, tuple] = {}   # id(model) -> (key, [kind, source], identity, model kept alive)
        gpus = workers.num_gpus if workers.num_gpus is not None else (1 if model.device.type == "cuda" else 0)
        self._actor_cls = ray.remote(_ScoreWorker)
        self._options = dict(num_cpus=workers.num_cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                             max_concurrency=2)
        self._args = (max(1, int(workers.num_cpus)), forwarded_env())
        self.id = uuid.uuid4().hex[:8]
        self.slots: list = [None] * workers.n
        self.pending_ready: dict = {}      # ready() ref -> slot
        self.idle: list[int] = []
        self._made = 0
        self.report.actor_names = [""] * workers.n
        self.report.pids = [0] * workers.n
        for s in range(workers.n):
            self._start(s)

    def _start(self, slot: int) -> None:
        name = f"arfuse-score-{self.id}-{slot}-{self._made}"
        self._made += 1
        actor = self._actor_cls.options(name=name, **self._options).remote(*self._args)
        self.slots[slot] = actor
        self.report.actor_names[slot] = name
        self.pending_ready[actor.ready.remote()] = slot

    def _lost(self, slot: int, what: str, err: BaseException) -> None:
        """Worker ``slot`` is gone: say so and start its replacement."""
        r = self.report
        pid = r.pids[slot] or "?"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"arfuse: warning: worker {slot + 1} of {self.workers.n} (pid {pid}) was lost {what} "
              f"({type(err).__name__}{': ' + cause[:160] if cause else ''}): starting a replacement", file=sys.stderr,
              flush=True)
        with contextlib.suppress(Exception):
            self.ray.kill(self.slots[slot])
        if r.replaced >= self.workers.max_retries * self.workers.n + self.workers.n:
            raise ArfuseError(f"{r.replaced} Ray workers were lost while scoring: giving up (the finished chunks are "
                              f"cached; rerun to resume). Last error: {type(err).__name__}: {cause}")
        r.replaced += 1
        self._start(slot)

    def _check_ready(self, ref, slot: int) -> None:
        try:
            pid = self.ray.get(ref)
        except lost_worker_errors(self.ray) as e:
            if getattr(e, "actor_init_failed", False):   # its start failed: another try fails alike
                raise ArfuseError(f"a Ray worker could not start: {worker_message(e)}") from None
            self._lost(slot, "while starting", e)
            return
        self.report.pids[slot] = pid
        self.idle.append(slot)

    def _register(self, model) -> tuple:
        """The key, source and identity the workers load and check ``model`` by (made once per model)."""
        if id(model) not in self.models:
            from arfuse.adapters.actor import model_source

            kind, source = model_source(model, "cpu", "float32")
            box = [kind, source if kind == "spec" else self.ray.put(source)]
            self.models[id(model)] = (uuid.uuid4().hex, box, _identity(model), model)
        return self.models[id(model)]

    def run(self, model, docs, chunks, todo, k: int, batch_size: int, advance) -> Iterator[tuple[int, TokenRecords]]:
        ray, w = self.ray, self.workers
        mkey, box, want, _ = self._register(model)
        left = sum(sum(win.n_targets for _, win in chunks[i]) for i in todo)
        target = max(1, min(_chunk_targets(), math.ceil(left / (PIECES_PER_WORKER * w.n))))
        queue = deque(plan_pieces(chunks, todo, batch_size, target))
        parts: dict[int, dict[int, TokenRecords]] = {i: {} for i in todo}
        need = {i: sum(1 for p in queue if p.chunk == i) for i in todo}
        docs_box = [ray.put(docs)]
        inflight: dict = {}   # ref -> (slot, piece)
        try:
            while queue or inflight:
                while queue and self.idle:
                    slot, piece = self.idle.pop(0), queue.popleft()
                    items = [chunks[piece.chunk][j] for j in piece.idx]
                    ref = self.slots[slot].score.remote(mkey, box, docs_box, items, k, batch_size)
                    inflight[ref] = (slot, piece)
                if not inflight and not self.pending_ready:
                    raise ArfuseError("no Ray worker is left to score with: rerun to resume from the cache")
                done, _ = ray.wait(list(inflight) + list(self.pending_ready), num_returns=1)
                ref = done[0]
                if ref in self.pending_ready:
                    self._check_ready(ref, self.pending_ready.pop(ref))
                    continue
                slot, piece = inflight.pop(ref)
                try:
                    arrays, loaded = ray.get(ref)
                except lost_worker_errors(ray) as e:
                    piece.attempts += 1
                    self.report.retries += 1
                    if piece.attempts > w.max_retries:
                        raise ArfuseError(f"chunk {piece.chunk}, a piece of {piece.n_targets:,} targets, failed "
                                          f"{piece.attempts} times on Ray workers ({worker_message(e)}): the finished "
                                          "chunks are cached; rerun to resume") from None
                    self._lost(slot, f"scoring a piece of chunk {piece.chunk} ({piece.n_targets:,} targets); the "
                               f"piece is retried (retry {piece.attempts} of at most {w.max_retries})", e)
                    queue.appendleft(piece)
                    continue
                except ray.exceptions.RayTaskError as e:   # the piece's own error: no retry
                    self.idle.append(slot)
                    raise ArfuseError(worker_message(e)) from None
                self.idle.append(slot)
                if loaded is not None and loaded != want:
                    raise ArfuseError(f"Ray worker {slot + 1} (pid {self.report.pids[slot]}) loaded another model "
                                      f"than this process ({model.info.name}: identity, tokenizer, dtype or vocabulary "
                                      "differ): give every node the same files (the same path or hub revision)")
                rec = TokenRecords(**arrays)
                if len(rec) != piece.n_targets:
                    raise ArfuseError(f"a Ray worker returned {len(rec):,} records for a piece of {piece.n_targets:,} "
                                      "targets: rerun (the finished chunks are cached)")
                self.report.pieces += 1
                parts[piece.chunk][piece.idx[0]] = (piece, rec)
                advance(len(rec))
                if len(parts[piece.chunk]) == need[piece.chunk]:
                    yield piece.chunk, _assemble(chunks[piece.chunk], parts.pop(piece.chunk).values())
        finally:   # left early (an error, or the caller stopped): the busy workers are free for the next run
            for ref, (slot, _) in inflight.items():
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
                self.idle.append(slot)

    def close(self) -> None:
        for a in self.slots:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.slots = []


def _chunk_targets() -> int:
    from arfuse.scoring.scorer import CHUNK_TARGETS

    return CHUNK_TARGETS


def _assemble(items, pieces) -> TokenRecords:
    """The chunk's records from its pieces: each window's rows put back in chunk order."""
    by_window: dict[int, TokenRecords] = {}
    for piece, rec in pieces:
        at = 0
        for j in piece.idx:
            n = items[j][1].n_targets
            by_window[j] = TokenRecords(*(a[at:at + n] for a in rec.arrays().values()))
            at += n
    return TokenRecords.concat([by_window[j] for j in range(len(items))])
