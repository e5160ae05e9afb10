"""GGUF files run by llama.cpp (llama-cpp-python): the quantised weights used as they are, on the CPU.

The spec is ``llamacpp:PATH.gguf`` or ``llamacpp:NAME`` for a short name (``llamacpp:smollm2-135m``);
a plain ``.gguf`` path still loads with transformers (dequantised to float32). Text is tokenised
by the same Hugging Face tokenizer the transformers backend converts from the GGUF file, so
token ids, character offsets, ``tokenizer_fingerprint`` and ``token_bytes`` are identical between
the two backends (llama.cpp's own tokenizer gives the same ids on the texts tests/test_llamacpp.py
tries); only the logits differ, by the quantised arithmetic. Scores are cached apart from the
transformers backend's: ``info.kind`` is "llamacpp" and the identity names the engine.

``forward_logits`` (scoring) feeds the batch rows one by one through one scoring context (a ``Llama``
object). Generation (``forward_step``) puts the rows of a batch into one llama.cpp context as sequences
(``SeqContext``, llama.cpp's sequence ids, a KV cache per row), fed together in one ``llama_decode``
call per step and trimmed per row on rollback; rows that join from another batch (the server) bring
their context along. A step's logits never depend on how many tokens it fed nor on the other rows
(``STEP_MODES`` below: where llama.cpp's one-token kernels differ from its batch kernels, a lone token
runs as a batch of two), so speculative decoding reproduces the plain fused greedy output exactly and a
row's text is the same alone or in a batch.
"""
from __future__ import annotations

import atexit
import bisect
import weakref
from pathlib import Path

import numpy as np
import torch

from arfuse.adapters.base import CausalLM, ModelInfo, StepState
from arfuse.adapters.hf import (
    HFTokenizerMethods,
    check_gguf_file,
    file_sha256,
    load_hf_tokenizer,
)
from arfuse.errors import ArfuseError

PREFIX = "llamacpp:"
INSTALL_HINT = ("the llama.cpp backend needs llama-cpp-python: pip install -e '.[llamacpp]' "
                "(compiles llama.cpp, several minutes)")
DEFAULT_N_CTX = 2048   # the scorer's default window (1024) and a generation after it
# How a lone token is run. llama.cpp's stock build computes a one-token batch with other kernels than a
# batch of two or more (its llamafile sgemm serves only batches: on SmolLM2's Q4_1 file a one-token step's
# log-probs differ from a full pass by up to 1.5 nats over the vocabulary), while every batch of 2 or more
# tokens gives logits bit-identical to a full pass. Built without llamafile (-DGGML_LLAMAFILE=OFF, as the
# Makefile builds it) the two paths are one and a one-token step equals a full pass bit for bit.
# "batched" runs a lone token as a batch of two (the token twice) and drops the second from the KV cache:
# every step equals a full forward on any build, so speculative decoding (which verifies drafts in
# batches) gives exactly the plain fused output and generation agrees with the scores; it costs about
# 1.4x a one-token step. "single" runs llama.cpp's one-token path. "auto" (the default) probes the build
# and file at load: "single" where a one-token step gives a full pass's logits bit for bit, else "batched".
STEP_MODES = ("auto", "batched", "single")
DEFAULT_STEPS = "auto"
PROBE_TEXT = "In the beginning God created the heaven and the earth, 4004 years before 1 A.D.; or so it's said."


def is_llamacpp_spec(spec: str) -> bool:
    return spec.strip().lower().startswith(PREFIX)


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ArfuseError(INSTALL_HINT) from e
    _errors_only_log()
    return llama_cpp


_LOG_CALLBACK = None   # kept alive for as long as llama.cpp may call it


def _errors_only_log() -> None:
    """llama.cpp's own log, errors only. llama-cpp-python 0.3.36 maps ggml's log levels one off (its
    table predates GGML_LOG_LEVEL_DEBUG = 1), so with verbose=False it prints warnings, such as a context
    longer than the model was trained for, into the user's output, and hides errors."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import ctypes
    import sys

    import llama_cpp

    error, cont = 4, 5   # ggml.h: GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT
    last = [0]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level == error or (level == cont and last[0] == error):
            print(text.decode("utf-8", "replace"), end="", flush=True, file=sys.stderr)
        if level != cont:
            last[0] = level

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _LOG_CALLBACK = callback


def load_llamacpp(spec: str, *, device: str = "cpu", dtype: str = "float32", name: str | None = None,
                  n_ctx: int | None = None, n_threads: int | None = None, steps: str | None = None,
                  **_) -> LlamaCppLM:
    """The loader of ``llamacpp:PATH.gguf`` / ``llamacpp:NAME`` specs (arfuse.adapters.registry)."""
    from arfuse.adapters.aliases import resolve_alias

    rest = spec.strip()[len(PREFIX):]
    if not rest:
        raise ArfuseError(f"{spec!r}: give a GGUF file or a short name after {PREFIX} (e.g. llamacpp:smollm2-135m)")
    alias = resolve_alias(rest)
    path = alias or str(Path(rest).expanduser())
    if Path(path).suffix != ".gguf":
        raise ArfuseError(f"{spec}: the llama.cpp backend loads .gguf files only (give llamacpp:PATH.gguf)")
    if device not in ("cpu", "auto"):
        raise ArfuseError(f"the llama.cpp backend runs on the CPU here: use --device cpu (not {device!r}) with {spec}")
    if dtype != "float32":
        raise ArfuseError(f"{spec}: llama.cpp computes with the GGUF file's own weights and gives float32 logits: "
                          f"drop --dtype {dtype} (or use --dtype float32)")
    return LlamaCppLM(path, name=name or (f"{PREFIX}{rest}" if alias else f"{PREFIX}{Path(path).name}"),
                      n_ctx=n_ctx, n_threads=n_threads, steps=steps)


class SeqContext:
    """One llama.cpp context holding up to ``slots`` sequences (llama.cpp's sequence ids), each the KV cache of
    one generation row with the model's whole context: a step feeds every row of a context in one
    ``llama_decode`` call, so rows share the matrix products, and a row's logits are those of its full pass
    whatever else the batch holds (tested bit for bit). Each sequence has a cache of its own: llama.cpp
    0.3.36's unified cache gave other logits after a rollback had left holes in it. With separate caches
    llama.cpp cuts a batch into micro-batches of equal tokens per row over consecutive sequence ids (rows
    take the lowest free ids; once rows in between have left, the rest run in more micro-batches), which
    can leave one row's token alone in one: where a lone token runs on other kernels (steps "batched"),
    rows are fed one by one."""

    def __init__(self, lm: LlamaCppLM, slots: int):
        import llama_cpp._internals as internals
        import llama_cpp.llama_cpp as lowlevel

        self.ll = lowlevel
        # what decoding needs of the model, and the Llama object that owns its weights: held here, not the
        # LlamaCppLM (whose pool holds this context), so that no reference cycle leaves the order of the two
        # frees to the garbage collector; the weights go only after every context on them has closed
        self.name, self.n_ctx, self.vocab = lm.info.name, lm.n_ctx, lm.info.vocab_size
        self.owner = lm._scorer
        self.slots = slots
        p = lowlevel.llama_context_default_params()
        p.n_ctx = lm.n_ctx * slots
        p.n_seq_max = slots
        p.kv_unified = False   # one cache per sequence (a unified one gave wrong logits after a rollback)
        p.n_batch = p.n_ubatch = N_BATCH
        p.n_threads = p.n_threads_batch = lm.n_threads
        p.flash_attn_type = lowlevel.LLAMA_FLASH_ATTN_TYPE_DISABLED   # as llama-cpp-python's Llama(...) runs
        try:
            self._ctx = internals.LlamaContext(model=lm._scorer._model, params=p, verbose=False)
        except Exception as e:  # noqa: BLE001 -- out of memory for the KV cache, mostly
            raise ArfuseError(f"{lm.info.name}: llama.cpp cannot open a context for {slots} rows of {lm.n_ctx} "
                              f"tokens ({e}): generate fewer prompts at once, or load it with a smaller n_ctx") from e
        self.ctx = self._ctx.ctx
        self.mem = lowlevel.llama_get_memory(self.ctx)
        self.batch = lowlevel.llama_batch_init(N_BATCH + 1, 0, 1)
        self._free_batch = weakref.finalize(self, lowlevel.llama_batch_free, self.batch)   # once: here or at close
        self.free = list(range(slots))   # ascending: rows take the lowest ids
        self.n_past = [0] * slots
        _SEQ_CONTEXTS.add(self)

    @property
    def closed(self) -> bool:
        return self.batch is None

    def take(self) -> int:
        """A free sequence id, emptied."""
        seq = self.free.pop(0)
        self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.n_past[seq] = 0
        return seq

    def release(self, seq: int) -> None:
        if self.closed:   # at exit, a state still alive after _close_contexts freed the context
            return
        self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.n_past[seq] = 0
        bisect.insort(self.free, seq)

    def move(self, src: int, dst: int) -> None:
        """Sequence ``src``'s cache becomes free id ``dst``'s (llama.cpp copies it at its next decode)."""
        self.ll.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.ll.llama_memory_seq_rm(self.mem, src, -1, -1)
        self.n_past[dst], self.n_past[src] = self.n_past[src], 0
        self.free.remove(dst)
        bisect.insort(self.free, src)

    def trim(self, seq: int, n: int) -> None:
        """Keep the first ``n`` tokens of sequence ``seq``."""
        if not self.ll.llama_memory_seq_rm(self.mem, seq, n, -1):
            raise ArfuseError("llama.cpp cannot drop the last tokens of this model's memory (a recurrent or "
                              "sliding-window cache): the llama.cpp backend cannot roll it back")
        self.n_past[seq] = n

    def decode(self, feeds: list[tuple[int, list[int]]], lone_as_two: bool) -> list[np.ndarray]:
        """Feed each ``(seq, ids)`` after that sequence's tokens, all in as few ``llama_decode`` calls as
        N_BATCH allows; each feed's logits (len(ids), V) float32. With ``lone_as_two`` a call that would hold
        one token holds it twice (the copy dropped again): llama.cpp's batch kernels then compute it."""
        V = self.vocab
        for seq, ids in feeds:   # every feed checked before any position moves
            if self.n_past[seq] + len(ids) > self.n_ctx:
                raise ArfuseError(f"{self.name}: {self.n_past[seq] + len(ids)} tokens exceed the llama.cpp "
                                  f"context of {self.n_ctx} (load it with a larger n_ctx)")
        items = []   # (feed index, seq, position, token)
        for f, (seq, ids) in enumerate(feeds):
            start = self.n_past[seq]
            items += [(f, seq, start + i, t) for i, t in enumerate(ids)]
            self.n_past[seq] = start + len(ids)
        # in the order of the sequence ids: llama.cpp cuts a batch whose sequences are out of order (or not
        # consecutive) into one micro-batch per sequence, at the cost of a pass per row (1.8x at 4 rows)
        items.sort(key=lambda it: (it[1], it[2]))
        outs = [np.empty((len(ids), V), dtype=np.float32) for _, ids in feeds]
        filled = [0] * len(feeds)
        b = self.batch
        for c in range(0, len(items), N_BATCH):
            chunk = items[c:c + N_BATCH]
            rows = [(seq, pos, tok, 1) for _, seq, pos, tok in chunk]
            if len(rows) == 1 and lone_as_two and rows[0][1] + 1 < self.n_ctx:   # room for the copy
                seq, pos, tok, _ = rows[0]
                rows.append((seq, pos + 1, tok, 0))
            b.n_tokens = len(rows)
            for j, (seq, pos, tok, want) in enumerate(rows):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
                b.seq_id[j][0] = seq
            rc = self.ll.llama_decode(self.ctx, b)
            if rc != 0:
                raise ArfuseError(f"{self.name}: llama.cpp could not decode a batch of {len(rows)} tokens "
                                  f"(llama_decode returned {rc}{': no room left in its KV cache' if rc == 1 else ''})")
            if len(rows) > len(chunk):   # the copy of a lone token leaves the cache again
                self.ll.llama_memory_seq_rm(self.mem, rows[1][0], rows[1][1], -1)
            logits = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(len(chunk) * V,))
            logits = logits.reshape(len(chunk), V)
            for j, (f, _, _, _) in enumerate(chunk):
                outs[f][filled[f]] = logits[j]
                filled[f] += 1
        return outs

    def close(self) -> None:
        if self.batch is not None:
            self._free_batch()
            self.batch = None
        self._ctx.close()


class LlamaCppState(StepState):
    """Each batch row is a sequence of a ``SeqContext``: ``rows[b] = (context, seq)``. The rows of one
    context are fed in one call; a state whose rows joined from another batch (``concat``) may span two
    contexts, fed one after the other. ``fed[b]`` says, for each position fed to row b since the last
    rollback, whether it was a real token (padding is never fed)."""

    def __init__(self, rows: list[tuple[SeqContext, int]], pool: list | None = None, fresh=None):
        self.rows = rows           # changed in place only: the finaliser below releases what is live
        self.fed: list[list[bool]] = [[] for _ in rows]
        self._pool = pool
        self._fresh = fresh        # (n) -> a state of n empty rows (rows that join having seen nothing)
        weakref.finalize(self, _release_rows, self.rows, pool)

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        for (ctx, seq), k, fed in zip(self.rows, keep.tolist(), self.fed):
            # the last n_fed positions of the batch; a row that joined later is padded on the left
            tail = ([False] * max(0, n_fed - len(fed)) + fed[-n_fed:]) if n_fed else []
            drop = sum(tail[int(k):])
            if drop:
                ctx.trim(seq, ctx.n_past[seq] - drop)
        self.fed = [[] for _ in self.rows]

    def select(self, rows: torch.Tensor) -> None:
        idx = rows.tolist()
        if len(set(idx)) != len(idx):
            raise ArfuseError("the llama.cpp backend cannot copy a row's context (a strategy that replicates rows, "
                              "such as --strategy segment, needs the transformers backend)")
        keep = set(idx)
        gone = [r for i, r in enumerate(self.rows) if i not in keep]
        self.rows[:] = [self.rows[i] for i in idx]
        self.fed = [self.fed[i] for i in idx]
        _release_rows(gone, self._pool)
        self._compact()

    def _compact(self) -> None:
        """Each context's rows onto its lowest sequence ids: llama.cpp runs rows in one micro-batch only
        where their ids are consecutive, so rows that leave from the middle would split the rest."""
        for ctx in {id(c): c for c, _ in self.rows}.values():
            mine = sorted((seq, b) for b, (c, seq) in enumerate(self.rows) if c is ctx)
            for seq, b in reversed(mine):
                if not ctx.free or ctx.free[0] > seq:
                    break
                dst = ctx.free[0]
                ctx.move(seq, dst)
                self.rows[b] = (ctx, dst)

    def concat(self, other: LlamaCppState | None, n_other: int) -> None:
        """Rows join by moving ``other``'s sequences over (they are released when this state goes, not
        ``other``); rows that have seen nothing get sequences of a new context."""
        if other is None:
            if self._fresh is None:
                raise ArfuseError("this llama.cpp state cannot open sequences for new rows")
            other = self._fresh(n_other)
        if not isinstance(other, LlamaCppState):
            raise ArfuseError(f"cannot join a {type(other).__name__} to a LlamaCppState: states of one model only")
        self.rows.extend(other.rows)
        self.fed.extend(other.fed)
        other.rows.clear()
        other.fed = []

    def feed(self, lm: LlamaCppLM, ids: list[list[int]], real: list[list[bool]]) -> list[np.ndarray]:
        """Each row's real tokens fed, grouped by context; each row's logits (its real tokens, V)."""
        groups: dict[int, list[int]] = {}
        for b, (ctx, _) in enumerate(self.rows):
            groups.setdefault(id(ctx), []).append(b)
        out: list[np.ndarray | None] = [None] * len(self.rows)
        together = lm.steps != "batched"   # else each row alone, its lone tokens as batches of two
        for members in (groups.values() if together else [[b] for b in range(len(self.rows))]):
            ctx = self.rows[members[0]][0]
            new = [[t for t, r in zip(ids[b], real[b]) if r] for b in members]
            logits = ctx.decode([(self.rows[b][1], n) for b, n in zip(members, new)], lm.steps == "batched")
            for b, lg in zip(members, logits):
                out[b] = lg
        for b, flags in enumerate(real):
            self.fed[b].extend(flags)
        return out


def _release_rows(rows: list, pool: list | None) -> None:
    """Give the rows' sequences back to their contexts; a context with none in use goes to ``pool``,
    which keeps the POOL_MAX with the most rows (each holds a KV cache of rows x n_ctx tokens; a
    larger one serves a smaller batch too) and closes the others."""
    for ctx, seq in rows:
        ctx.release(seq)
        if pool is not None and len(ctx.free) == ctx.slots:
            pool.append(ctx)
            if len(pool) > POOL_MAX:
                smallest = min(pool, key=lambda c: c.slots)
                pool.remove(smallest)
                smallest.close()
    rows.clear()


# SeqContexts this process opened: closed at exit, before the Llama objects whose model they use
_SEQ_CONTEXTS: weakref.WeakSet = weakref.WeakSet()
N_BATCH = 512   # tokens per llama_decode call
POOL_MAX = 4    # idle generation contexts a model keeps for its next generations


# every llama.cpp context this process opened: closed at exit, before the interpreter tears down the
# modules llama-cpp-python's own finaliser needs (it prints "TypeError: 'NoneType' object is not
# callable" otherwise)
_CONTEXTS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_contexts() -> None:
    for sc in list(_SEQ_CONTEXTS):
        try:
            sc.close()
        except Exception:  # noqa: BLE001 -- at exit, a context that cannot close is left to the OS
            pass
    for llm in list(_CONTEXTS):
        try:
            llm.close()
        except Exception:  # noqa: BLE001 -- at exit, a context that cannot close is left to the OS
            pass


def _trim_kv(llm) -> None:
    """Drop the KV cells past ``llm.n_tokens`` now (``Llama.eval`` does it too, before its next batch)."""
    ctx = llm._ctx
    for name in ("memory_seq_rm", "kv_cache_seq_rm"):
        fn = getattr(ctx, name, None)
        if fn is not None:
            if fn(-1, llm.n_tokens, -1) is False:
                raise ArfuseError("llama.cpp cannot drop the last tokens of this model's memory (a recurrent or "
                                  "sliding-window cache): the llama.cpp backend cannot roll it back")
            return


def _special_id(from_tokenizer: int | None, from_llama: int) -> int | None:
    if from_tokenizer is not None:
        return from_tokenizer
    return int(from_llama) if from_llama is not None and int(from_llama) >= 0 else None


class LlamaCppLM(HFTokenizerMethods, CausalLM):
    """A GGUF causal LM run by llama.cpp, tokenised by the transformers backend's tokenizer."""

    def __init__(self, path: str, *, name: str | None = None, n_ctx: int | None = None,
                 n_threads: int | None = None, steps: str | None = None):
        steps = steps or DEFAULT_STEPS
        if steps not in STEP_MODES:
            raise ArfuseError(f"steps {steps!r}: use 'auto' (the default: 'single' where this build's one-token "
                              "step equals a full pass, else 'batched'), 'batched' (a lone token runs as a batch of "
                              "two: every step equals a full forward) or 'single' (llama.cpp's one-token path)")
        self.steps = steps
        llama_cpp = _import_llama_cpp()
        gguf = Path(path)
        check_gguf_file(gguf)
        self.path = str(gguf)
        self.n_ctx = int(n_ctx or DEFAULT_N_CTX)
        self.n_threads = int(n_threads or torch.get_num_threads())
        self.tokenizer = load_hf_tokenizer(self.path)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ArfuseError(f"{path}: arfuse needs a fast (Rust) tokenizer for character offsets; none is available")
        self._llama_cls = llama_cpp.Llama
        self._scorer = self._new_context()
        self._pool: list = []   # idle generation contexts, reused by the next generation (loading one costs)
        llm = self._scorer
        # transformers' conversion of a GGUF tokenizer drops BOS/EOS for some architectures (gpt2): llama.cpp
        # reads them from the same file's tokenizer.ggml.*_token_id
        self.bos_id = _special_id(self.tokenizer.bos_token_id, llm.token_bos())
        self.eos_id = _special_id(self.tokenizer.eos_token_id, llm.token_eos())
        self.default_add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        n_vocab = int(llm.n_vocab())
        n_ctx_train = int(llm._model.n_ctx_train())
        self.info = ModelInfo(
            name=name or f"{PREFIX}{gguf.name}",
            kind="llamacpp",
            num_parameters=int(llm._model.n_params()),
            vocab_size=n_vocab,
            max_length=min(self.n_ctx, n_ctx_train) if n_ctx_train > 0 else self.n_ctx,
            identity={"gguf_sha256": file_sha256(gguf), "engine": "llama.cpp",
                      "llama_cpp_python": getattr(llama_cpp, "__version__", None)},
        )
        self.steps_probe: dict | None = None   # what "auto" measured at load
        if self.steps == "auto":
            self.steps_probe = self._probe_steps()
            self.steps = self.steps_probe["steps"]

    def _probe_steps(self) -> dict:
        """Do one-token steps give a full pass's logits bit for bit on this build and file? Feeds a short
        text once as one batch and once token by token through the scoring context (a few milliseconds
        per token). Kernels are deterministic: where the two paths are one, they agree on every input."""
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:16]
        if len(ids) < 2:
            return {"steps": "batched", "tokens": len(ids), "max_abs_logit_diff": None}
        llm = self._scorer
        llm.reset()
        _trim_kv(llm)
        llm.eval(ids)
        full = np.array(llm.scores[:len(ids)], dtype=np.float32)
        llm.reset()
        _trim_kv(llm)
        single = []
        for t in ids:
            at = llm.n_tokens
            llm.eval([t])
            single.append(np.array(llm.scores[at], dtype=np.float32))
        llm.reset()
        _trim_kv(llm)
        gap = float(np.abs(np.stack(single) - full).max())
        return {"steps": "single" if gap == 0.0 else "batched", "tokens": len(ids), "max_abs_logit_diff": gap}

    def _new_context(self):
        import llama_cpp.llama_cpp as lowlevel

        default = lowlevel.llama_model_default_params

        def params():
            p = default()
            # no weight repacking: llama-cpp-python 0.3.36 built natively (AVX-512, AMX) crashed in its
            # first decode with repacked Q4_1 weights here; the plain CPU buffers run correctly
            p.use_extra_bufts = False
            return p

        lowlevel.llama_model_default_params = params   # what Llama.__init__ calls, for this load only
        try:
            llm = self._llama_cls(model_path=self.path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                  n_threads_batch=self.n_threads, logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ArfuseError(f"{self.path}: llama.cpp cannot load this GGUF file ({e})") from e
        finally:
            lowlevel.llama_model_default_params = default
        try:
            _CONTEXTS.add(llm)
        except TypeError:  # a stand-in without weak references (tests)
            pass
        return llm

    # ---- running sequences through a context ------------------------------------------
    def _feed(self, llm, ids: list[int]) -> np.ndarray:
        """Logits (n, V) float32 of ``ids`` fed after the context's ``n_tokens`` tokens."""
        start = llm.n_tokens
        if start + len(ids) > self.n_ctx:
            raise ArfuseError(f"{self.info.name}: {start + len(ids)} tokens exceed the llama.cpp context of "
                              f"{self.n_ctx} (load it with a larger n_ctx)")
        if len(ids) == 1 and self.steps == "batched" and start + 2 <= self.n_ctx:
            llm.eval([ids[0], ids[0]])   # the batch kernels; the second copy is dropped again
            llm.n_tokens -= 1
            _trim_kv(llm)
            return llm.scores[start:start + 1]
        llm.eval(ids)
        return llm.scores[start:start + len(ids)]

    def _row_logits(self, ids: list[int], n: int) -> torch.Tensor:
        """The last ``n`` positions' logits (n, V) of one sequence, from a fresh start."""
        llm = self._scorer
        llm.reset()
        _trim_kv(llm)
        if not ids:
            return torch.zeros(0, self.info.vocab_size)
        out = self._feed(llm, ids)
        return torch.from_numpy(np.array(out[len(ids) - n:], dtype=np.float32))

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        out = torch.zeros(B, T, self.info.vocab_size)
        real = None if attention_mask is None else attention_mask.bool().cpu()
        for b in range(B):
            row = input_ids[b].tolist()
            if real is None:
                out[b] = self._row_logits(row, T)
            else:  # only the real tokens are fed; padding positions stay zero
                ids = [t for t, r in zip(row, real[b].tolist()) if r]
                out[b, real[b]] = self._row_logits(ids, len(ids))
        return out

    @torch.no_grad()
    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stack([self._row_logits(row, n) for row in input_ids.tolist()])

    def _new_state(self, B: int) -> LlamaCppState:
        """B rows, each an empty sequence of one context: an idle context of the pool with room for them
        (the smallest), else a new one (its KV cache is B x n_ctx tokens)."""
        fits = [c for c in self._pool if c.slots >= B]
        if fits:
            ctx = min(fits, key=lambda c: c.slots)
            self._pool.remove(ctx)
        else:
            ctx = SeqContext(self, B)
        return LlamaCppState([(ctx, ctx.take()) for _ in range(B)], self._pool, self._new_state)

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: LlamaCppState | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LlamaCppState]:
        B, T = input_ids.shape
        if past is None:
            past = self._new_state(B)
        ids = input_ids.tolist()
        if attention_mask is None or bool(attention_mask.all()):   # no padding (batch 1 always): no masked copy
            rows = past.feed(self, ids, [[True] * T for _ in range(B)])
            return torch.from_numpy(np.stack(rows) if B > 1 else rows[0][None]), past
        real = attention_mask.bool().cpu()
        rows = past.feed(self, ids, real.tolist())
        out = torch.zeros(B, T, self.info.vocab_size)
        for b, lg in enumerate(rows):
            if len(lg):
                out[b, real[b]] = torch.from_numpy(lg)
        return out, past

    def llama_tokenize(self, text: str) -> list[int]:
        """llama.cpp's own token ids of ``text`` (no BOS, special tokens not parsed): for comparison only."""
        return list(self._scorer.tokenize(text.encode(), add_bos=False, special=False))
