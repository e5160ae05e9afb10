"""The OpenAI request and response shapes the server speaks: bodies checked field by field (a bad
value is a 400 that names the field and the fix), responses and stream chunks built from engine
events. No model code here."""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from arfuse.serve.engine import TokenLogprob

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Params:
    """What one request asks for, checked (``max_tokens`` None: the server's default)."""

    prompt: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    top_logprobs: int | None     # None: no log-probs
    ignore_eos: bool


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


def _number(body: dict, name: str, default: float, lo: float, hi: float, hint: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(name, f"{name} {v!r} must be a number in [{lo:g}, {hi:g}] ({hint})")
    return float(v)


def _int(body: dict, name: str, lo: int, hint: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(name, f"{name} {v!r} must be an integer >= {lo} ({hint})")
    return v


def _common(body: dict) -> dict:
    """The sampling fields completions and chat share."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("n", "best_of"):
        v = body.get(name)
        if v is not None and v != 1:
            raise _bad(name, f"{name}={v!r}: this server returns one choice per request; send n=1 (or leave it out) "
                             "and make several requests for several samples", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise _bad(name, f"{name}={v!r}: penalties would change the fused distribution P; leave {name} out (0)",
                       "unsupported_value")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported (tokens follow the fused distribution P): leave it out",
                   "unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise _bad("stop", f"stop {stop!r} must be a string or a list of up to 4 strings")
    if any(not s for s in stops):
        raise _bad("stop", "an empty stop string would stop at once: give non-empty stop strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", f"seed {seed!r} must be an integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", f"stream {stream!r} must be true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options", f"stream_options {opts!r} must be an object such as {{\"include_usage\": true}}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", f"ignore_eos {ignore_eos!r} must be true or false")
    top_k = _int(body, "top_k", 0, "sample among the k most likely fused tokens; 0 keeps every token")
    return {"temperature": _number(body, "temperature", 1.0, 0.0, 2.0, "0 is greedy decoding of the fused P"),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, "nucleus sampling; 1 keeps the whole distribution"),
            "top_k": top_k or 0, "stop": stops, "seed": seed, "stream": bool(stream),
            "include_usage": bool(opts.get("include_usage", False)), "ignore_eos": ignore_eos}


def _max_tokens(body: dict, *names: str) -> int | None:
    for name in names:
        v = _int(body, name, 1, "new tokens to generate at most")
        if v is not None:
            return v
    return None


def completion_params(body: dict) -> Params:
    """A /v1/completions body, checked."""
    c = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "prompt must be one string (a list of several prompts or of token ids is not supported: "
                             "send one request per prompt)")
    if body.get("echo"):
        raise _bad("echo", "echo is not supported: prepend the prompt to the returned text yourself",
                   "unsupported_value")
    if body.get("suffix"):
        raise _bad("suffix", "suffix (insertion) is not supported by a left-to-right fused model: leave it out",
                   "unsupported_value")
    lp = _int(body, "logprobs", 0, "the fused log-probs of the chosen tokens and of that many top tokens")
    if lp is not None and lp > MAX_TOP_LOGPROBS:
        raise _bad("logprobs", f"logprobs {lp} must be at most {MAX_TOP_LOGPROBS}")
    return Params(prompt=prompt, max_tokens=_max_tokens(body, "max_tokens"), top_logprobs=lp, **c)


def chat_params(body: dict, render) -> Params:
    """A /v1/chat/completions body, checked; ``render(messages)`` makes the prompt text."""
    c = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a role and a content")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", \"text\": ...})"
                                                         " are supported by a language model")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    lp = body.get("logprobs", False)
    if not isinstance(lp, bool) and lp is not None:
        raise _bad("logprobs", f"logprobs {lp!r} must be true or false (top_logprobs gives how many top tokens)")
    top = _int(body, "top_logprobs", 0, "top tokens per position, with logprobs: true")
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"top_logprobs {top} must be at most {MAX_TOP_LOGPROBS}")
    if top and not lp:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    return Params(prompt=render(clean), max_tokens=_max_tokens(body, "max_completion_tokens", "max_tokens"),
                  top_logprobs=(top or 0) if lp else None, **c)


# ---- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(lps: list[TokenLogprob], token_str, offset: int) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_str(x.token_id) for x in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{token_str(i): v for i, v in x.top} for x in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], token_str, token_bytes=None) -> dict:
    """The chat ``logprobs`` object: ``content``, one entry per token with its top alternatives.
    ``token_bytes(i)``: the token's own UTF-8 bytes (a byte-level token may hold part of a character,
    which its decoded string shows as U+FFFD); the string's bytes where not given."""
    def entry(i: int, v: float) -> dict:
        s = token_str(i)
        b = token_bytes(i) if token_bytes is not None else None
        return {"token": s, "logprob": v, "bytes": list(b if b is not None else s.encode("utf-8"))}

    return {"content": [dict(entry(x.token_id, x.logprob), top_logprobs=[entry(i, v) for i, v in x.top])
                        for x in lps], "refusal": None}
