"""GGUF files run by llama.cpp (llama-cpp-python): the quantised weights used as they are, on the CPU.

The spec is ``llamacpp:PATH.gguf`` or ``llamacpp:NAME`` for a short name (``llamacpp:smollm2-135m``);
a plain ``.gguf`` path still loads with transformers (dequantised to float32). Text is tokenised
by the same Hugging Face tokenizer the transformers backend converts from the GGUF file, so
token ids, character offsets, ``tokenizer_fingerprint`` and ``token_bytes`` are identical between
the two backends (llama.cpp's own tokenizer gives the same ids on the texts tests/test_llamacpp.py
tries); only the logits differ, by the quantised arithmetic. Scores are cached apart from the
transformers backend's: ``info.kind`` is "llamacpp" and the identity names the engine.

llama.cpp runs one sequence per context: ``forward_logits`` feeds the batch rows one by one through
one scoring context; ``forward_step`` gives each batch row a context of its own (a ``Llama`` object:
the weights are memory-mapped once by the OS, each context adds its KV cache), whose KV cache is
trimmed on rollback. A step's logits never depend on how many tokens it fed (``STEP_MODES`` below: where
llama.cpp's one-token kernels differ from its batch kernels, a lone token runs as a batch of two), so
speculative decoding reproduces the plain fused greedy output exactly.
"""
from __future__ import annotations

import atexit
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


class LlamaCppState(StepState):
    """One llama.cpp context per batch row; each context's ``n_tokens`` is that row's real length.
    ``fed[b]`` says, for each position fed to row b since the last rollback, whether it was a real
    token (padding is never fed to the context)."""

    def __init__(self, contexts: list, pool: list | None = None, fresh=None):
        self.contexts = contexts   # changed in place only: the finaliser below returns what is live
        self.fed: list[list[bool]] = [[] for _ in contexts]
        self._pool = pool
        self._fresh = fresh        # () -> an empty context of the same model (rows that join having seen nothing)
        # when the state goes, its contexts go back to the model's pool (no reload)
        self._finalizer = weakref.finalize(self, pool.extend, self.contexts) if pool is not None else None

    def concat(self, other: LlamaCppState | None, n_other: int) -> None:
        """Each row has a context of its own, so rows join by taking ``other``'s contexts over (they no
        longer go back to the pool when ``other`` goes), or empty contexts for rows that have seen nothing."""
        if other is None:
            if self._fresh is None:
                raise ArfuseError("this llama.cpp state cannot open contexts for new rows")
            self.contexts.extend(self._fresh() for _ in range(n_other))
            self.fed.extend([] for _ in range(n_other))
            return
        if not isinstance(other, LlamaCppState):
            raise ArfuseError(f"cannot join a {type(other).__name__} to a LlamaCppState: states of one model only")
        if other._finalizer is not None:
            other._finalizer.detach()
        self.contexts.extend(other.contexts)
        self.fed.extend(other.fed)
        other.contexts, other.fed = [], []

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        for llm, k, fed in zip(self.contexts, keep.tolist(), self.fed):
            tail = fed[len(fed) - n_fed:] if n_fed else []
            drop = sum(tail[int(k):])
            if drop:
                llm.n_tokens -= drop   # Llama.eval also removes the KV cells from n_tokens on
                _trim_kv(llm)
        self.fed = [[] for _ in self.contexts]

    def select(self, rows: torch.Tensor) -> None:
        idx = rows.tolist()
        if len(set(idx)) != len(idx):
            raise ArfuseError("the llama.cpp backend cannot copy a row's context (a strategy that replicates rows, "
                              "such as --strategy segment, needs the transformers backend)")
        kept = [self.contexts[i] for i in idx]
        if self._pool is not None:
            self._pool.extend(c for i, c in enumerate(self.contexts) if i not in set(idx))
        self.contexts[:] = kept
        self.fed = [self.fed[i] for i in idx]


# every llama.cpp context this process opened: closed at exit, before the interpreter tears down the
# modules llama-cpp-python's own finaliser needs (it prints "TypeError: 'NoneType' object is not
# callable" otherwise)
_CONTEXTS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_contexts() -> None:
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

    def _idle_context(self):
        """A context with nothing in it: an idle one from the pool (emptied), else a new one (a load)."""
        if self._pool:
            llm = self._pool.pop()
            llm.reset()
            _trim_kv(llm)
            return llm
        return self._new_context()

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

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: LlamaCppState | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LlamaCppState]:
        B, T = input_ids.shape
        if past is None:
            past = LlamaCppState([self._idle_context() for _ in range(B)], self._pool, self._idle_context)
        if attention_mask is None or bool(attention_mask.all()):   # no padding (batch 1 always): no masked copy
            rows = [torch.from_numpy(np.array(self._feed(llm, ids), dtype=np.float32))
                    for llm, ids in zip(past.contexts, input_ids.tolist())]
            for fed in past.fed:
                fed.extend([True] * T)
            return (rows[0][None] if B == 1 else torch.stack(rows)), past
        real = attention_mask.bool().cpu()
        out = torch.zeros(B, T, self.info.vocab_size)
        for b, llm in enumerate(past.contexts):
            flags = real[b].tolist()
            new = [int(t) for t, r in zip(input_ids[b].tolist(), flags) if r]
            if new:
                out[b, real[b]] = torch.from_numpy(np.array(self._feed(llm, new), dtype=np.float32))
            past.fed[b].extend(flags)
        return out, past

    def llama_tokenize(self, text: str) -> list[int]:
        """llama.cpp's own token ids of ``text`` (no BOS, special tokens not parsed): for comparison only."""
        return list(self._scorer.tokenize(text.encode(), add_bos=False, special=False))
