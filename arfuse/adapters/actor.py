"""A model held by a Ray actor: generation's steps run where the model and its KV cache live.

``ActorLM`` is a ``CausalLM`` whose ``forward_step`` sends the new token ids to a Ray actor
holding the real model (any backend ``load_model`` knows) and returns the logits of the new
positions; the KV cache (the real backend's ``StepState``) stays inside the actor, keyed by the
proxy state's id. ``ActorState.rollback``/``select`` are queued and sent with the next step (the
actor applies them first, in order), so speculative verification, rollback and dropping
finished rows cost no extra round trip, and the decoding loop is the one of in-process models.

What comes back: the full logits rows of the fed positions, on the CPU, in the model's dtype
(B x T x V; 196 KB per position for a 49,152-token vocabulary in float32), so every rule, the
linear mixture as much as top-k union, fuses exactly what it fuses in one process. The tokenizer
comes back once (a Hugging Face fast tokenizer is copied to this process, so encoding and
decoding cost no round trip; any other tokenizer is asked remotely).

Each model may sit on its own device or node (``num_gpus``, ``address``). A lost actor loses its
KV cache: the generation fails with an ``ArfuseError`` saying so (rerun it); scoring, whose
work is stateless, retries instead (``arfuse.scoring.shards``).

Ray is imported only when an ``ActorLM`` is made.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator

import torch

from arfuse.adapters.base import CausalLM, Encoding, StepState
from arfuse.errors import ArfuseError

INSTALL = "pip install -e '.[ray]'"
INLINE_BYTES = 4 << 20   # results Ray returns inline on a cluster started here (``connect``)


# ---- Ray itself ---------------------------------------------------------------------------------
def import_ray(purpose: str):
    """The ``ray`` module, or an ArfuseError naming ``purpose`` and the install command."""
    try:
        import ray
    except ImportError:
        raise ArfuseError(f"{purpose} needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str | None, purpose: str = "--workers", **init):
    """Ray, initialised: on the cluster at ``address`` ("auto", "HOST:6379", "ray://HOST:10001"),
    or a local one on this machine's CPUs (and GPUs) when it is None (``init``: more arguments of
    ``ray.init`` for it, e.g. ``num_cpus``)."""
    ray = import_ray(purpose)
    if not ray.is_initialized():
        local = address is None and not os.environ.get("RAY_ADDRESS")
        # a cluster started here returns results up to 4 MiB inline rather than through its object store:
        # a step's logits rows (196 KB a position for a 49,152-token vocabulary) come back in half the time
        extra = {"_system_config": {"max_direct_call_object_size": INLINE_BYTES}, **init} if local else {}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **extra)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArfuseError(f"cannot connect to {where} ({first}): start one with `ray start --head` and pass "
                              "--ray-address HOST:6379 (or 'auto'), or leave --ray-address out to start a local "
                              "one") from e
    return ray


def lost_worker_errors(ray) -> tuple[type, ...]:
    """Ray's errors of a lost worker (its process, node or result), as opposed to the task's own error."""
    ex = ray.exceptions
    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "OutOfMemoryError", "NodeDiedError",
             "ActorUnavailableError")
    return tuple(getattr(ex, n) for n in names if isinstance(getattr(ex, n, None), type))


def worker_message(e: BaseException) -> str:
    """A Ray error as one line: the worker's ArfuseError text as it is, else the last line of the error."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ArfuseError):
        return str(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("arfuse.errors.ArfuseError:"):
            return ln.split(":", 1)[1].strip()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]


def forwarded_env() -> dict[str, str]:
    """The variables a worker needs to find what this process finds (cache, data, hub)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("ARFUSE_", "HF_", "TRANSFORMERS_"))}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def model_source(model_or_spec, device: str, dtype: str, tokenizer: str | None = None) -> tuple[str, object]:
    """How an actor gets a model: ("spec", (spec, device, dtype, tokenizer)) for a name or path,
    each actor loading it itself (local paths made absolute); ("spec", ...) too for a model that
    ``load_model`` loaded in this process (found by identity); else ("object", the model), shipped
    through Ray's object store."""
    from pathlib import Path

    from arfuse import adapters

    if isinstance(model_or_spec, str):
        spec = model_or_spec
    else:
        found = [key for key, m in list(adapters._LOADED.items()) if m is model_or_spec]
        if not found:
            return "object", model_or_spec
        spec, dev, dtype, tokenizer = found[0]
        # "map" spreads a model over a node's GPUs; otherwise the device kind (each actor's GPUs are cuda:0...)
        device = dev if dev == "map" else ("cuda" if model_or_spec.device.type == "cuda" else "cpu")
    if Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().resolve())
    return "spec", (spec, device, dtype, tokenizer)


def load_source(kind: str, source, threads: int, env: dict):
    """In an actor: the model of ``model_source``, with ``threads`` torch threads."""
    os.environ.update(env)
    torch.set_num_threads(max(1, threads))
    if kind == "object":
        return source
    from arfuse.adapters import load_model

    spec, device, dtype, tok = source
    if device.startswith("cuda"):   # Ray makes the actor's GPUs visible as cuda:0, ...
        device = "cuda"
    return load_model(spec, device=device, dtype=dtype, tokenizer=tok)


# ---- the actor ----------------------------------------------------------------------------------
class _ModelActor:
    """Holds one model and the step states of the generations that use it."""

    def __init__(self, kind: str, source, threads: int, env: dict):
        self.model = load_source(kind, source, threads, env)
        self.states: dict[str, StepState | None] = {}
        self.kernels = None

    def describe(self) -> dict:
        m = self.model
        tok = getattr(m, "tokenizer", None)
        local = tok is not None and getattr(tok, "is_fast", False) and hasattr(m, "_running_text")
        return {"info": m.info, "bos_id": m.bos_id, "eos_id": m.eos_id, "default_add_bos": m.default_add_bos,
                "dtype": m.dtype, "device": str(m.device), "fingerprint": m.tokenizer_fingerprint(),
                "tokenizer": tok if local else None, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()

    @torch.no_grad()
    def step(self, sid: str, ids: torch.Tensor, mask: torch.Tensor | None, ops: list, kernels: bool) -> torch.Tensor:
        st = self.states.get(sid)
        for name, args in ops:   # the rollbacks, selections and joins queued since the last step, in order
            if name == "concat":   # another batch's state joins this one (continuous batching)
                other_sid, n_other, other_ops = args
                other = self.states.pop(other_sid, None)
                for o_name, o_args in other_ops:
                    if other is not None:
                        getattr(other, o_name)(*o_args)
                if st is None:
                    st = other
                else:
                    st.concat(other, n_other)
            elif st is not None:
                getattr(st, name)(*args)
        if kernels and self.kernels is None:
            self.kernels = self.model.fast_kernels()
        with self.kernels.active() if kernels else contextlib.nullcontext():
            logits, st = self.model.forward_step(ids, st, mask)
        self.states[sid] = st
        return logits.cpu()

    def drop(self, sid: str) -> None:
        self.states.pop(sid, None)

    def call(self, name: str, *args):
        out = getattr(self.model, name)(*args)
        return out.cpu() if isinstance(out, torch.Tensor) else out


# ---- the proxy ----------------------------------------------------------------------------------
class ActorState(StepState):
    """A step state kept in the actor: rollbacks and selections wait here for the next step."""

    def __init__(self, lm: "ActorLM"):
        self.lm = lm
        self.sid = uuid.uuid4().hex
        self.ops: list[tuple[str, tuple]] = []
        self.keep: list[ActorState] = []   # joined states, alive until their join is sent

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        self.ops.append(("rollback", (n_fed, keep.detach().cpu().clone())))

    def select(self, rows: torch.Tensor) -> None:
        self.ops.append(("select", (rows.detach().cpu().clone(),)))

    def concat(self, other: "ActorState | None", n_other: int) -> None:
        """``other``'s rows (a state of the same actor) join after this state's, in the actor, with the
        next step; ``other`` is kept alive until then, so that its state is not dropped first."""
        if other is not None and other.lm is not self.lm:
            raise ArfuseError("states of different actors cannot be joined: states of one model only")
        if other is None:
            raise ArfuseError("an ActorState joins only rows that have seen tokens")
        self.ops.append(("concat", (other.sid, n_other, list(other.ops))))
        other.ops = []
        self.keep.append(other)

    def __del__(self):
        with contextlib.suppress(Exception):   # the actor frees the KV cache; nothing to wait for
            if self.sid is not None:
                self.lm.actor.drop.remote(self.sid)


class _RemoteKernels:
    """``fast_kernels()`` of an ActorLM: entering ``active()`` makes the actor use its model's kernels."""

    def __init__(self, lm: "ActorLM"):
        self.lm = lm

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        before = self.lm._kernels_on
        self.lm._kernels_on = True
        try:
            yield
        finally:
            self.lm._kernels_on = before

    def refresh(self) -> None:
        pass


class ActorLM(CausalLM):
    """``model`` (a name, a path or a loaded CausalLM) held by a Ray actor with ``num_cpus`` CPUs
    (and torch threads) and ``num_gpus`` GPUs (None: one when ``device`` is CUDA), on the cluster
    at ``address`` or a local one."""

    _count = itertools.count()

    def __init__(self, model, *, device: str = "cpu", dtype: str = "float32", tokenizer: str | None = None,
                 num_cpus: float = 1.0, num_gpus: float | None = None, address: str | None = None,
                 wait: bool = True):
        if not num_cpus > 0:
            raise ArfuseError(f"num_cpus {num_cpus} must be > 0 (CPUs of the actor that holds the model)")
        self.ray = ray = connect(address, "--placement actors")
        kind, source = model_source(model, device, dtype, tokenizer)
        if kind == "object":
            source = ray.put(source)
        gpus = num_gpus if num_gpus is not None else (1 if str(device).startswith("cuda") else 0)
        self.actor = ray.remote(_ModelActor).options(
            num_cpus=num_cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0,
            name=f"arfuse-model-{uuid.uuid4().hex[:8]}-{next(self._count)}").remote(
                kind, source, int(num_cpus), forwarded_env())
        self._described = self.actor.describe.remote()
        if wait:
            self.ready()

    def ready(self) -> "ActorLM":
        """Wait until the actor has loaded its model; its description here (``wait=False`` starts an
        actor without waiting, so that several load at once)."""
        if self._described is None:
            return self
        d = self._get(self._described, "loading the model")
        self._described = None
        self.info, self.bos_id, self.eos_id = d["info"], d["bos_id"], d["eos_id"]
        self.default_add_bos, self.dtype, self._fp = d["default_add_bos"], d["dtype"], d["fingerprint"]
        self.tokenizer = d["tokenizer"]
        self.actor_pid, self.actor_device = d["pid"], d["device"]
        self.device = torch.device("cpu")   # where the logits come back
        self._kernels_on = False
        return self

    def _get(self, ref, doing: str = "running a step"):
        ray = self.ray
        try:
            return ray.get(ref)
        except lost_worker_errors(ray) as e:
            if getattr(e, "actor_init_failed", False):
                raise ArfuseError(f"the Ray actor could not load its model: {worker_message(e)}") from None
            name = getattr(getattr(self, "info", None), "name", "the model")
            raise ArfuseError(f"the Ray actor holding {name} was lost while {doing} ({type(e).__name__}): its KV "
                              "cache went with it; rerun the generation") from None
        except ray.exceptions.RayTaskError as e:
            raise ArfuseError(worker_message(e)) from None

    def _call(self, name: str, *args):
        return self._get(self.actor.call.remote(name, *args), f"calling {name}")

    def close(self) -> None:
        """Stop the actor (its model and every KV cache in it)."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)

    # ---- tokenizer: local when it could be copied here --------------------------------------
    def encode(self, text: str) -> Encoding:
        if self.tokenizer is not None:
            from arfuse.adapters.hf import HFTokenizerMethods

            return HFTokenizerMethods.encode(self, text)
        return self._call("encode", text)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return self._call("decode", list(ids))

    def tokenizer_fingerprint(self) -> str:
        return self._fp

    def token_bound(self, text: str) -> int | None:
        return super().token_bound(text) if self.tokenizer is not None else None

    def tokenizer_token_bytes(self) -> list[bytes | None]:
        return self._call("tokenizer_token_bytes")

    def encode_piece(self, text: str) -> list[int]:
        return self._call("encode_piece", text)

    def piece_boundary(self, text: str) -> int:
        return self._call("piece_boundary", text)

    # ---- scoring and steps ------------------------------------------------------------------
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._call("forward_logits", input_ids.cpu(), None if attention_mask is None else attention_mask.cpu())

    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        return self._call("forward_logits_tail", input_ids.cpu(), n)

    def forward_step(self, input_ids: torch.Tensor, past: ActorState | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ActorState]:
        """The logits (B, T, V) of the new tokens, computed in the actor on its KV cache."""
        return self.forward_step_finish(self.forward_step_start(input_ids, past, attention_mask))

    def forward_step_start(self, input_ids: torch.Tensor, past: ActorState | None = None,
                           attention_mask: torch.Tensor | None = None):
        """Send a step to the actor and return at once (a handle for ``forward_step_finish``): the
        decoding loop starts every actor-held model's step before it waits for any of them, so the
        models compute at the same time (``arfuse.generation.state.feed_all``)."""
        state = past if past is not None else ActorState(self)
        ops, state.ops = state.ops, []
        mask = None if attention_mask is None else attention_mask.cpu()
        ref = self.actor.step.remote(state.sid, input_ids.cpu(), mask, ops, self._kernels_on)
        for joined in state.keep:   # their states now live in this one: nothing left to drop
            joined.sid = None
        state.keep = []
        return ref, state

    def forward_step_finish(self, handle) -> tuple[torch.Tensor, ActorState]:
        ref, state = handle
        return self._get(ref), state

    def fast_kernels(self) -> _RemoteKernels:
        return _RemoteKernels(self)

    def input_embeddings(self) -> torch.Tensor:
        return self._call("input_embeddings")


_ACTORS: dict[tuple, ActorLM] = {}


def actor_models(models, *, device: str = "cpu", dtype: str = "float32", address: str | None = None,
                 num_cpus: float = 1.0, num_gpus: float | None = None) -> list[ActorLM]:
    """An ActorLM for each of ``models`` (specs or loaded CausalLMs), made once per process and
    reused; new actors load their models at the same time."""
    out = []
    for model in models:
        if isinstance(model, ActorLM):
            out.append(model)
            continue
        key = (model if isinstance(model, str) else id(model), device, dtype, address, num_cpus, num_gpus)
        lm = _ACTORS.get(key)
        if lm is None:
            lm = _ACTORS[key] = ActorLM(model, device=device, dtype=dtype, address=address, num_cpus=num_cpus,
                                        num_gpus=num_gpus, wait=False)
            lm._source = model   # a loaded model stays alive with its actor: its id stays its own
        out.append(lm)
    try:
        return [lm.ready() for lm in out]
    except ArfuseError:   # none of this call's actors is kept: the next call starts them afresh
        for key in [k for k, lm in _ACTORS.items() if any(lm is o for o in out)]:
            _ACTORS.pop(key).close()
        raise


def close_actors() -> None:
    """Stop every actor ``actor_model`` made."""
    for lm in _ACTORS.values():
        lm.close()
    _ACTORS.clear()
