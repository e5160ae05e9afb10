"""`arfuse serve`: an OpenAI-compatible HTTP server over the fused decoder, on FastAPI and uvicorn.

    POST /v1/completions, POST /v1/chat/completions (``stream: true`` as server-sent events),
    GET /v1/models, GET /health.

Requests are decoded together by one scheduler thread with continuous batching (``engine.py``):
a request joins the running batch at the next step after it arrives and leaves it when it ends
or its client disconnects. Every text equals ``arfuse.generate`` with the same prompt, settings
and seed. Limits answer as OpenAI does: a prompt too long or ``max_tokens`` over the limit is a
400, a full waiting queue a 503, a wrong API key a 401, each with an
``{"error": {"message", "type", "param", "code"}}`` body. SIGINT/SIGTERM stop taking requests,
let the ones in flight finish for ``shutdown_timeout`` seconds, then end the rest (finish reason
"cancelled") and exit.

Chat prompts use the LLM tokenizer's chat template where it has one; without one they are the
messages as ``role: content`` lines followed by ``assistant:`` (``FALLBACK_CHAT``).
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (the Request class)
import asyncio
import hmac
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from arfuse.errors import ArfuseError
from arfuse.serve.engine import (
    CANCELLED,
    Engine,
    Event,
    QueueFull,
    Request,
    ShuttingDown,
)
from arfuse.serve.protocol import (
    APIError,
    Params,
    chat_logprobs,
    chat_params,
    completion_logprobs,
    completion_params,
    error_body,
    new_id,
    now,
    usage,
)

log = logging.getLogger("arfuse.serve")

API_KEY_ENV = "ARFUSE_API_KEY"
DISCONNECT_POLL_S = 0.25   # how often a non-streaming request looks whether its client is still there
FALLBACK_CHAT = "role: content lines, then 'assistant:'"


@dataclass
class ServeLimits:
    """What one request may ask for."""

    max_prompt_tokens: int | None = None   # None: the models' context (minus the new tokens) is the limit
    max_tokens: int = 2048                 # max_tokens above this: 400
    default_max_tokens: int = 16           # /v1/completions without max_tokens (OpenAI's default)
    default_chat_max_tokens: int = 512     # /v1/chat/completions without it (cut to the room the context leaves)
    bos: str = "auto"

    def __post_init__(self):
        for name in ("max_tokens", "default_max_tokens", "default_chat_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ArfuseError(f"{name} {v!r} must be an integer >= 1 (--{name.replace('_', '-')})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ArfuseError(f"max prompt tokens {self.max_prompt_tokens} must be >= 1 (--max-prompt-tokens)")


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text of ``messages``: the tokenizer's chat template with the assistant's turn
    opened, or ``role: content`` lines and ``assistant:`` when it has none."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, limits: ServeLimits | None = None,
               manage_engine: bool = True):
    """The FastAPI app over ``engine``. With ``manage_engine`` the app starts the engine's thread at
    startup and stops it at shutdown."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    class _RowStream(StreamingResponse):
        """A stream that frees its row however the response ends: the generator's own ``finally``
        does not run when the client leaves before the generator has started (Starlette cancels the
        send of the headers and never iterates the body)."""

        def __init__(self, req: Request, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.req = req

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                engine.cancel(self.req)

    limits = limits or ServeLimits()
    tok = engine.tok
    tokenizer = getattr(tok, "tokenizer", None)
    chat_format = "chat template" if tokenizer is not None and getattr(tokenizer, "chat_template", None) \
        else FALLBACK_CHAT
    context = min((m.info.max_length for m in engine.models if m.info.max_length), default=None)
    key = api_key.encode() if api_key else None

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="arfuse", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else \
            {"Retry-After": "1"} if e.status == 503 else None   # busy or draining: clients back off, then retry
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e} (please report it)", "server_error",
                                       code="internal_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind), status_code=e.status_code)

    def authorize(request: HTTPRequest) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(401, "incorrect or missing API key: send the server's key (--api-key or "
                                f"{API_KEY_ENV}) as 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"model {model!r} is not served here: use {model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        return body

    def check_and_submit(p: Params, chat: bool, loop: asyncio.AbstractEventLoop,
                         queue: asyncio.Queue, bos: str) -> Request:
        """Settings and prompt checked (400 with the fix), then queued (503 when full). Runs in a worker thread."""
        from arfuse.generation.config import GenerationConfig

        def config(max_new: int):
            try:
                return GenerationConfig(max_new_tokens=max_new, temperature=p.temperature, top_p=p.top_p,
                                        top_k=p.top_k, stop=list(p.stop), seed=seed, stop_at_eos=not p.ignore_eos,
                                        bos=bos)
            except ArfuseError as e:
                raise APIError(400, str(e)) from None

        def tokens(cfg) -> list[list[int]]:
            try:
                return engine.check(p.prompt, cfg)
            except ArfuseError as e:
                # the API's names for the fixes, not the command line's
                msg = str(e).replace("max_new_tokens (--max-new-tokens)", "max_tokens").replace(
                    ", or pass truncate='left' (--truncate left) to drop the prompt's oldest tokens", "").replace(
                    " (or --bos always)", "")
                raise APIError(400, msg, param="messages" if chat else "prompt",
                               code="context_length_exceeded" if "context" in msg else "invalid_value") from None

        seed = p.seed if p.seed is not None else (0 if p.temperature == 0 else secrets.randbelow(2 ** 31))
        max_new = p.max_tokens
        if max_new is not None and max_new > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_new} is over this server's limit of {limits.max_tokens}: ask for at "
                                f"most {limits.max_tokens}", param="max_tokens", code="invalid_value")
        if max_new is None:
            max_new = limits.default_max_tokens if not chat else limits.default_chat_max_tokens
            if chat and context is not None:  # what the context leaves after the prompt
                n = len(tokens(config(1))[0])
                max_new = max(1, min(max_new, limits.max_tokens, context - n))
        cfg = config(max_new)
        ids = tokens(cfg)
        n_prompt = max(len(s) for s in ids)
        if limits.max_prompt_tokens is not None and n_prompt > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_prompt:,} tokens, over this server's limit of "
                                f"{limits.max_prompt_tokens:,} (--max-prompt-tokens): shorten it",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

        def on_event(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = Request(p.prompt, cfg, ids, on_event, p.top_logprobs)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_error",
                           code="queue_full") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down: retry on another server or later", type="server_error",
                           code="shutting_down") from None
        return req

    def token_str(i: int) -> str:
        with engine.tok_lock:
            return tok.decode([i])

    table: list = []

    def token_bytes(i: int) -> bytes | None:
        """What token ``i`` stands for in running text (None: special tokens, or no table)."""
        if not table:
            with engine.tok_lock:
                try:
                    table.append(tok.token_bytes())
                except Exception:  # noqa: BLE001 - an adapter without a string form of its tokens
                    table.append(None)
        tb = table[0]
        return tb[i] if tb is not None and 0 <= i < len(tb) else None

    async def run(request: HTTPRequest, chat: bool):
        authorize(request)
        body = await body_of(request)
        def render(msgs: list[dict]) -> str:
            try:
                return render_chat(tokenizer, msgs)
            except Exception as e:  # noqa: BLE001 - the template's own check (a jinja raise_exception)
                raise APIError(400, f"the model's chat template rejects these messages ({type(e).__name__}: {e}): "
                                    "check the roles and their order", param="messages") from None

        p = chat_params(body, render) if chat else completion_params(body)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        bos = limits.bos
        if chat and bos == "auto" and getattr(tokenizer, "bos_token", None) and p.prompt.startswith(tokenizer.bos_token):
            bos = "never"   # the chat template wrote BOS itself (Llama's, Mistral's): do not prepend a second one
        req = await run_in_threadpool(check_and_submit, p, chat, loop, queue, bos)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if p.stream:
            return _RowStream(req, stream(req, p, queue, rid, created, chat), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, req, queue, rid, created, chat)

    async def whole(request: HTTPRequest, req: Request, queue: asyncio.Queue, rid: str, created: int, chat: bool):
        texts, reason, error = [], None, None
        gone = asyncio.Event()

        async def watch() -> None:   # the client may leave while tokens keep coming: look every quarter second
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            gone.set()
            engine.cancel(req)

        watcher = asyncio.create_task(watch())
        try:
            while reason is None:
                ev = await queue.get()
                texts.append(ev.text)
                reason, error = ev.finish_reason, ev.error
        finally:
            watcher.cancel()
            engine.cancel(req)
        if gone.is_set():
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
        if reason == "error":
            return JSONResponse(error_body(f"generation failed: {error}", "server_error", code="generation_failed"), 500)
        text = "".join(texts)
        lps = req.logprobs if req.top_logprobs is not None else None
        u = usage(req.prompt_tokens, len(req.row.ids))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": chat_logprobs(lps, token_str, token_bytes) if lps is not None else None,
                      "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": u}
        choice = {"index": 0, "text": text, "finish_reason": reason,
                  "logprobs": completion_logprobs(lps, token_str, 0) if lps is not None else None}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice], "usage": u}

    async def stream(req: Request, p: Params, queue: asyncio.Queue, rid: str, created: int,
                     chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(choice: dict | None, extra: dict | None = None) -> str:
            d = {"id": rid, "object": obj, "created": created, "model": model_name,
                 "choices": [choice] if choice is not None else []}
            if p.include_usage:   # as OpenAI: every chunk has "usage", null but on the last one
                d["usage"] = None
            if extra:
                d.update(extra)
            return f"data: {json.dumps(d)}\n\n"

        offset = 0
        try:
            if chat:
                yield sse({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None})
            while True:
                ev = await queue.get()
                if ev.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(f'generation failed: {ev.error}', 'server_error'))}\n\n"
                    return
                if ev.text or ev.finish_reason or (ev.token_ids and req.top_logprobs is not None):
                    # (tokens whose text waits, an incomplete character or a possible stop string, make no
                    # empty chunk unless their log-probs were asked for)
                    lp = None
                    if req.top_logprobs is not None:
                        lp = chat_logprobs(ev.logprobs, token_str, token_bytes) if chat else \
                            completion_logprobs(ev.logprobs, token_str, offset)
                    offset += len(ev.text)
                    if chat:
                        delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
                        yield sse({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason})
                    else:
                        yield sse({"index": 0, "text": ev.text, "logprobs": lp,
                                   "finish_reason": ev.finish_reason})
                if ev.finish_reason is not None:
                    break
            if p.include_usage:
                yield sse(None, {"usage": usage(req.prompt_tokens, len(req.row.ids))})
            yield "data: [DONE]\n\n"
        finally:  # the client left (the task is cancelled) or the stream ended: free the row either way
            engine.cancel(req)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await run(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "arfuse"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queued,
                "max_batch": engine.max_batch, "max_queue": engine.max_queue, "context": context,
                "chat_format": chat_format, "stats": engine.stats.as_dict()}

    return app


@dataclass
class ServeConfig:
    """Everything `arfuse serve` needs: the models and rule, the limits, where to listen."""

    large: object
    small: Sequence | None = None
    weight: float | None = None
    weights: Sequence[float] | None = None
    rule: str = "linear"
    rule_params: dict | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    limits: ServeLimits | None = None
    shutdown_timeout: float = 30.0
    device: str = "cpu"
    dtype: str = "float32"
    fast_kernels: bool = True
    log_level: str = "info"
    placement: str = "process"             # "actors": each model in a Ray actor of its own (the extra ray)
    ray_address: str | None = None

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ArfuseError(f"port {self.port} must be in 0..65535 (--port)")
        if self.shutdown_timeout < 0:
            raise ArfuseError(f"shutdown timeout {self.shutdown_timeout} must be >= 0 seconds (--shutdown-timeout)")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.placement not in ("process", "actors"):
            raise ArfuseError(f"placement {self.placement!r}: use 'process' or 'actors' (--placement)")
        if self.ray_address is not None and self.placement != "actors":
            raise ArfuseError("--ray-address places models in actors of that cluster: add --placement actors")


def build_engine(cfg: ServeConfig) -> tuple[Engine, str]:
    """Load the models, bind the rule, make the engine; and the served model's name."""
    from arfuse.adapters import load_model
    from arfuse.adapters.base import CausalLM
    from arfuse.fusion.registry import get_rule, resolve_weights
    from arfuse.generation.api import build_rule

    smalls = [] if cfg.small is None else ([cfg.small] if isinstance(cfg.small, (str, CausalLM)) else list(cfg.small))
    params = cfg.rule_params or {}
    if get_rule(cfg.rule).weighted:   # bad weights fail before any model loads
        resolve_weights(cfg.weight, cfg.weights, 1 + len(smalls))

    if cfg.placement == "actors":   # each model and its KV caches in a Ray actor (arfuse.adapters.actor)
        from arfuse.generation.api import _load_all

        models = _load_all([cfg.large, *smalls], cfg.device, cfg.dtype, "actors", cfg.ray_address)
    else:
        def load(spec):
            return spec if isinstance(spec, CausalLM) else load_model(str(spec), device=cfg.device, dtype=cfg.dtype)

        models = [load(cfg.large)] + [load(s) for s in smalls]
    rule = build_rule(models, rule=cfg.rule, weight=cfg.weight, weights=cfg.weights, **params)
    name = cfg.model_name or "+".join(m.info.name for m in models)
    return Engine(models, rule, max_batch=cfg.max_batch, max_queue=cfg.max_queue, fast_kernels=cfg.fast_kernels), name


def _uvicorn_server(config, engine: Engine, drain_s: float):
    """uvicorn's server, whose exit signal first tells the engine to drain: the rows in flight
    finish within ``drain_s`` seconds, then end as "cancelled"; new requests get a 503."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain(drain_s)
            super().handle_exit(sig, frame)
            self._captured_signals.clear()   # a graceful shutdown exits 0, not by re-raising the signal

    return Server(config)


def serve(cfg: ServeConfig | None = None, **kwargs) -> int:
    """Run the server until SIGINT/SIGTERM; returns 0 after a graceful shutdown. Give a ``ServeConfig``
    or its fields: ``serve(large="smollm2-135m", small="runs/kjv-slm", weight=0.9, port=8000)``."""
    import uvicorn

    if cfg is None:
        cfg = ServeConfig(**kwargs)
    elif kwargs:
        raise ArfuseError(f"give a ServeConfig or its fields ({', '.join(kwargs)}), not both")

    engine, name = build_engine(cfg)
    app = create_app(engine, model_name=name, api_key=cfg.api_key, limits=cfg.limits)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.shutdown_timeout + 5, access_log=False)
    server = _uvicorn_server(config, engine, cfg.shutdown_timeout)
    log.info("serving %s (%s) on http://%s:%d/v1", name, engine.rule.describe() if hasattr(engine.rule, "describe")
             else engine.rule, cfg.host, cfg.port)
    server.run()
    return 0


__all__ = ["CANCELLED", "ServeConfig", "ServeLimits", "build_engine", "create_app", "render_chat", "serve"]
