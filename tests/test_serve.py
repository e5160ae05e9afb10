"""`arfuse serve`: the official openai client, unmodified, against a live server on localhost with the
tiny models; every text is compared with ``arfuse.generate`` with the same settings and seed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import require_extra

require_extra("fastapi", "serve")
require_extra("uvicorn", "serve")
openai = require_extra("openai", "test")

from arfuse.generation.api import generate

W = 0.7
KEY = "sk-arfuse-test"
NAME = "tiny-fused"


def _wait(cond, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _live(app):
    """uvicorn serving ``app`` in a thread on a free localhost port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    _wait(lambda: server.started, 20, "the server to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(15)
        sock.close()


@pytest.fixture(scope="module")
def live(tiny_pair, one_thread):
    from arfuse.serve.server import ServeConfig, ServeLimits, build_engine, create_app

    large, small = tiny_pair
    engine, _ = build_engine(ServeConfig(large=large, small=[small], weight=W, max_batch=4, max_queue=3))
    app = create_app(engine, model_name=NAME, api_key=KEY, limits=ServeLimits(max_tokens=220, max_prompt_tokens=120))
    with _live(app) as url:
        yield url, engine


@pytest.fixture
def client(live):
    url, _ = live
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _ref(tiny_pair, prompt: str, **kw) -> str:
    large, small = tiny_pair
    return generate(prompt, large=large, small=small, weight=W, **kw).text


PROMPTS = ["The quick brown", "In the beginning was the word, and", "A stitch in time",
           "Café naïve résumé", "the lazy dog", "saves nine. The"]


# ---- the step states join: the basis of continuous batching -------------------------------------
def test_joined_states_give_each_row_its_own_logprobs(tiny_pair):
    """A running batch (two rows, a step taken) joined by a newly prefilled one (a longer prompt) gives
    every row the log-probs it has alone; leaving rows trim the padding they leave behind."""
    from arfuse.generation.state import ModelState

    large, _ = tiny_pair
    seqs = [large.encode(p).ids for p in ("The quick brown fox", "A stitch", "In the beginning was the word, and")]

    def alone(ids: list[int]) -> torch.Tensor:
        st = ModelState(large)
        return st.feed(torch.tensor([ids]))[0, -1]

    run = ModelState(large)
    a, b = seqs[0], seqs[1]
    w = max(len(a), len(b)) - 1
    ids = torch.zeros(2, w, dtype=torch.long)
    mask = torch.zeros(2, w, dtype=torch.bool)
    for r, s in enumerate((a, b)):
        ids[r, w - len(s) + 1:] = torch.tensor(s[:-1])
        mask[r, w - len(s) + 1:] = True
    run.feed(ids, mask)
    lp = run.feed(torch.tensor([[a[-1]], [b[-1]]]))[:, 0]
    nxt = lp.argmax(-1)
    new = ModelState(large)
    c = seqs[2]
    new.feed(torch.tensor([c[:-1]]))
    run.concat(new, 2, 1)
    assert run.past.length == len(c) - 1   # the longer cohort set the width; the running rows were padded
    out = run.feed(torch.tensor([[int(nxt[0])], [int(nxt[1])], [c[-1]]]))[:, 0]
    for row, ids_alone in enumerate((a + [int(nxt[0])], b + [int(nxt[1])], c)):
        torch.testing.assert_close(out[row], alone(ids_alone), atol=1e-5, rtol=1e-5)
    run.select(torch.tensor([1]))            # only the short row is left: its leading padding goes
    assert run.past.length == int(run.past.mask[0].sum())
    out = run.feed(torch.tensor([[5]]))[0, 0]
    torch.testing.assert_close(out, alone(b + [int(nxt[1]), 5]), atol=1e-5, rtol=1e-5)


def test_join_rows_that_have_seen_nothing(tiny_pair):
    """A cohort of one-token prompts has no state yet: it joins as empty rows."""
    from arfuse.generation.state import ModelState

    large, _ = tiny_pair
    a = large.encode("The quick brown").ids
    run = ModelState(large)
    run.feed(torch.tensor([a[:-1]]))
    run.concat(ModelState(large), 1, 1)
    out = run.feed(torch.tensor([[a[-1]], [7]]))[:, 0]
    torch.testing.assert_close(out[1], ModelState(large).feed(torch.tensor([[7]]))[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ModelState(large).feed(torch.tensor([a]))[0, -1], atol=1e-5, rtol=1e-5)


# ---- the API ---------------------------------------------------------------------------------------
def test_completion_equals_generate(client, tiny_pair):
    greedy = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    ref = generate(PROMPTS[0], large=tiny_pair[0], small=tiny_pair[1], weight=W, max_new_tokens=24)
    assert greedy.choices[0].text == ref.text
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    sampled = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0.9, top_p=0.9,
                                        seed=11, stop=[" the"])
    ref = generate(PROMPTS[1], large=tiny_pair[0], small=tiny_pair[1], weight=W, max_new_tokens=30,
                   temperature=0.9, top_p=0.9, seed=11, stop=[" the"])
    assert sampled.choices[0].text == ref.text
    assert sampled.choices[0].finish_reason == ("stop" if ref.finish_reason in ("eos", "stop") else "length")
    assert sampled.usage.prompt_tokens == ref.prompt_tokens


def test_chat_equals_generate_on_the_rendered_prompt(client, live, tiny_pair):
    from arfuse.serve.server import FALLBACK_CHAT, render_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0.7, seed=4)
    prompt = render_chat(None, msgs)   # the tiny tokenizer has no chat template: the fallback
    assert prompt == "system: Be brief.\nuser: The quick brown fox\nassistant:"
    assert out.choices[0].message.content == _ref(tiny_pair, prompt, max_new_tokens=20, temperature=0.7, seed=4)
    assert out.choices[0].message.role == "assistant"
    assert _get_json(live[0] + "/health")["chat_format"] == FALLBACK_CHAT
    # without max_tokens a chat reply may fill what the context (256 tokens) leaves after the prompt, up to
    # the server's limit (220 here)
    full = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == min(220, 256 - full.usage.prompt_tokens)
    assert full.choices[0].finish_reason == "length"


def test_streams_equal_generate(client, tiny_pair):
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=25, temperature=0.8, seed=2,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _ref(tiny_pair, PROMPTS[2], max_new_tokens=25, temperature=0.8, seed=2)
    assert len([c for c in chunks if c.choices]) > 3          # text came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    msgs = [{"role": "user", "content": "In the beginning"}]
    chat = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=18, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    from arfuse.serve.server import render_chat

    assert text == _ref(tiny_pair, render_chat(None, msgs), max_new_tokens=18)


def test_logprobs_are_the_fused_distributions(client, tiny_pair):
    """Each chosen token's log-prob is log(w p_L + (1 - w) p_S) of the full sequence, scored afresh."""
    large, small = tiny_pair
    out = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=10, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    prompt_ids = large.encode(PROMPTS[3]).ids
    ref = generate(PROMPTS[3], large=large, small=small, weight=W, max_new_tokens=10, stop_at_eos=False)
    gen_ids = ref.token_ids
    ids = torch.tensor([prompt_ids + gen_ids])
    fused = torch.logaddexp(large.logprobs(ids)[0] + torch.log(torch.tensor(W)),
                            small.logprobs(ids)[0] + torch.log(torch.tensor(1 - W)))  # (T, V)
    n = len(prompt_ids)
    want = [float(fused[n - 1 + i, t]) for i, t in enumerate(gen_ids)]
    assert len(lp.token_logprobs) == 10
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):   # greedy: the chosen token is the top one
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[3]}],
                                          max_tokens=30, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 30 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    # each token's own bytes (a byte-level token may hold part of a character): together, the reply's text
    raw = [bytes(c.bytes) for c in content]
    assert any(b.decode("utf-8", "replace") != b.decode("utf-8", "ignore") for b in raw)   # partial characters
    assert b"".join(raw).decode("utf-8", "replace") == chat.choices[0].message.content


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = _get_json(live[0] + "/health")
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["context"] == 256


# ---- errors ---------------------------------------------------------------------------------------
def test_wrong_api_key_gets_401(live):
    url, _ = live
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key" and "sk-wrong" not in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_limits_get_400_with_the_fix(client):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40   # far past the tiny context of 256
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=long_prompt, max_tokens=8)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    assert "256" in e.value.body["message"] and "shorten the prompt" in e.value.body["message"]
    assert "lower max_tokens" in e.value.body["message"] and "--" not in e.value.body["message"]  # the API's fix
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:   # fits the context, not the server's --max-prompt-tokens
        client.completions.create(model=NAME, prompt="The quick brown fox jumps over the lazy dog. " * 10,
                                  max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded" and "120" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=500)
    assert e.value.body["param"] == "max_tokens" and "220" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, n=2)
    assert e.value.body["param"] == "n" and "n=1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert NAME in e.value.body["message"]


def test_full_queue_gets_503(client, live, tiny_pair):
    """While the scheduler is held between steps, seven requests are in: four take the free rows
    (--max-batch 4), three wait (--max-queue 3); an eighth gets 503; the seven then finish with their
    own texts."""
    _, engine = live
    results = {}

    def ask(i):
        results[i] = client.completions.create(model=NAME, prompt=PROMPTS[i % 6], max_tokens=6 + i,
                                               temperature=0).choices[0].text

    with engine.lock:
        assert engine.active == 0
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(7)]
        for t in threads:
            t.start()
        _wait(lambda: engine.queued == 7, what="seven requests in")
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=NAME, prompt="hi", max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert "3 requests are waiting" in e.value.body["message"] and e.value.response.headers["retry-after"] == "1"
    for t in threads:
        t.join(30)
    assert results == {i: _ref(tiny_pair, PROMPTS[i % 6], max_new_tokens=6 + i) for i in range(7)}


def test_concurrent_requests_join_the_batch_and_give_the_sequential_texts(client, live, tiny_pair):
    """Three requests run; three more join the running batch mid-way (continuous batching), two of
    them sampled with top-p: every text is that of generate one prompt at a time with the same seed."""
    _, engine = live
    before, steps, submitted = engine.stats.joins, engine.stats.steps, engine.stats.submitted
    lengths = [60, 45, 50, 30, 40, 35]
    sampled = {3: {"temperature": 0.9, "top_p": 0.8, "seed": 21}, 5: {"temperature": 1.1, "top_p": 0.6, "seed": 4}}
    results = {}

    def ask(i):
        r = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i],
                                      **sampled.get(i, {"temperature": 0}), extra_body={"ignore_eos": True})
        results[i] = r.choices[0].text

    first = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    second = [threading.Thread(target=ask, args=(i,)) for i in range(3, 6)]
    for t in first:
        t.start()
    _wait(lambda: engine.stats.submitted == submitted + 3 and engine.queued == 0 and engine.stats.steps > steps,
          what="the first three rows to run")
    with engine.lock:   # between two steps: rows are mid-way, three more requests wait
        assert engine.active >= 1
        for t in second:
            t.start()
        _wait(lambda: engine.queued == 3, what="three requests waiting")
    for t in first + second:
        t.join(60)
    assert engine.stats.joins > before
    for i in range(6):
        assert results[i] == _ref(tiny_pair, PROMPTS[i], max_new_tokens=lengths[i], stop_at_eos=False,
                                  **sampled.get(i, {})), i


def test_a_client_that_disconnects_frees_its_slot(client, live, tiny_pair):
    _, engine = live
    cancelled = engine.stats.cancelled
    stream = client.completions.create(model=NAME, prompt="The", max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    with engine.lock:   # hold decoding while the client hangs up
        assert engine.active == 1
        row = engine._active[0]
        stream.close()
        _wait(lambda: row.cancelled.is_set(), what="the server to see the disconnect")
    _wait(lambda: engine.active == 0, what="the slot to be freed")
    assert engine.stats.cancelled == cancelled + 1
    assert len(row.row.ids) < 200            # it stopped early: its slot was freed, not run to the end
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert again.choices[0].text == _ref(tiny_pair, PROMPTS[0], max_new_tokens=5)


def test_drain_finishes_the_streams_in_flight_and_refuses_new_ones(tiny_pair):
    """Shutdown with time to spare: a stream in flight runs to its end; a new request gets 503."""
    from arfuse.serve.server import ServeConfig, build_engine, create_app

    large, small = tiny_pair
    engine, _ = build_engine(ServeConfig(large=large, small=[small], weight=W, max_batch=2, max_queue=2))
    with _live(create_app(engine, model_name=NAME)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        stream = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        it = iter(stream)
        text = next(it).choices[0].text
        engine.drain(30)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length"
        assert text + "".join(x.choices[0].text for x in rest) == _ref(tiny_pair, PROMPTS[0], max_new_tokens=40,
                                                                         stop_at_eos=False)


# ---- the command ----------------------------------------------------------------------------------
def test_arfuse_serve_command_and_graceful_shutdown(tiny_models, tiny_pair, tmp_path):
    """`arfuse serve` as a process: a key from the environment, a completion equal to generate, and
    SIGTERM during a stream: the stream ends with a finish reason and [DONE], the process exits 0."""
    import http.client

    port = _free_port()
    env = dict(os.environ, ARFUSE_API_KEY=KEY, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "arfuse.cli.main", "serve", "--large", tiny_models["large"], "--small",
           tiny_models["small"], "--weight", str(W), "--port", str(port), "--name", NAME, "--threads", "1",
           "--shutdown-timeout", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            try:
                return _get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok"
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                return False

        _wait(up, 60, "arfuse serve to listen")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        out = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0.5, seed=9)
        assert out.choices[0].text == _ref(tiny_pair, PROMPTS[1], max_new_tokens=16, temperature=0.5, seed=9)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
        lines = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"},
                     body=json.dumps({"model": NAME, "prompt": "The", "max_tokens": 240, "temperature": 0,
                                      "stream": True, "ignore_eos": True}))
        r = conn.getresponse()
        assert r.status == 200
        for raw in r:   # the SSE lines as they come
            line = raw.decode().strip()
            if line:
                lines.append(line)
            if len(lines) == 1:
                proc.send_signal(signal.SIGTERM)
        conn.close()
        assert proc.wait(30) == 0
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "cancelled"   # --shutdown-timeout 0: cut short at once
        assert len(lines) - 2 < 240
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the scheduler, driven step by step (no thread, no HTTP) -------------------------------------------
def _engine(tiny_pair, **kw):
    from arfuse.serve.server import ServeConfig, build_engine

    large, small = tiny_pair
    engine, _ = build_engine(ServeConfig(large=large, small=[small], weight=W, **kw))
    return engine


def _request(engine, prompt: str, events: list, **settings):
    from arfuse.generation.config import GenerationConfig
    from arfuse.serve.engine import Request

    cfg = GenerationConfig(**settings)
    return Request(prompt, cfg, engine.check(prompt, cfg), events.append)


def test_rows_that_join_mid_run_give_generate_texts_and_the_cache_stays_as_wide_as_its_longest_row(tiny_pair):
    """Six requests (greedy and top-p sampling, prompts of 1 to 13 tokens) through three rows: they join
    a running batch and leave it at different steps. After every step each model's KV cache is exactly
    as wide as the longest row's tokens (the padding and history of the rows that left are trimmed),
    and every text is that of generate alone with the same settings and seed."""
    engine = _engine(tiny_pair, max_batch=3, max_queue=10)
    plan = [  # (submitted before iteration, prompt, settings)
        (0, PROMPTS[1], {"max_new_tokens": 30, "stop_at_eos": False}),
        (0, "The", {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 5, "stop_at_eos": False}),
        (3, PROMPTS[3], {"max_new_tokens": 20, "temperature": 1.2, "top_p": 0.7, "seed": 8, "stop_at_eos": False}),
        (3, PROMPTS[0], {"max_new_tokens": 25, "stop_at_eos": False}),
        (6, "a", {"max_new_tokens": 10, "stop_at_eos": False}),     # one token: a row that has seen nothing joins
        (9, PROMPTS[2], {"max_new_tokens": 15, "temperature": 0.8, "top_k": 20, "seed": 3, "stop_at_eos": False}),
    ]
    events = [[] for _ in plan]
    reqs = [None] * len(plan)
    widths = []
    for it in range(200):
        for j, (at, prompt, settings) in enumerate(plan):
            if at == it:
                reqs[j] = _request(engine, prompt, events[j], **settings)
                engine.submit(reqs[j])
        if it > 9 and engine.idle:
            break
        engine._iteration()
        if engine._active:
            for m, st in enumerate(engine._states):
                want = max(len(r.ids[m]) + len(r.row.ids) - 1 for r in engine._active)
                assert st.past.length == want, (it, m)
                widths.append(st.past.length)
    assert engine.idle and engine.stats.joins >= 2 and engine.stats.max_batch_seen == 3
    assert max(widths) < max(len(r.ids[0]) + r.cfg.max_new_tokens for r in reqs)
    for (_, prompt, settings), evs, r in zip(plan, events, reqs):
        ref = generate(prompt, large=tiny_pair[0], small=tiny_pair[1], weight=W, **settings)
        assert "".join(e.text for e in evs) == ref.text and r.row.ids == ref.token_ids, prompt
        assert evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])


def test_a_request_cancelled_while_queued_frees_its_place_at_once(tiny_pair):
    """--max-queue counts the requests waiting for a free row: with one row and --max-queue 0 the first
    request is taken; a cancelled waiting request leaves the queue (finish reason "cancelled") at once."""
    from arfuse.serve.engine import CANCELLED, QueueFull

    engine = _engine(tiny_pair, max_batch=1, max_queue=0)
    ev = [[], [], []]
    first = _request(engine, "The", ev[0], max_new_tokens=3)
    engine.submit(first)                                  # a free row: it does not wait
    with pytest.raises(QueueFull):
        engine.submit(_request(engine, "The", ev[1], max_new_tokens=3))
    engine.max_queue = 1
    second = _request(engine, "A stitch", ev[1], max_new_tokens=3)
    engine.submit(second)
    with pytest.raises(QueueFull):
        engine.submit(_request(engine, "The", ev[2], max_new_tokens=3))
    engine.cancel(second)                                 # its client left while it waited
    assert engine.queued == 1 and [e.finish_reason for e in ev[1]] == [CANCELLED]
    third = _request(engine, PROMPTS[0], ev[2], max_new_tokens=4, stop_at_eos=False)
    engine.submit(third)
    while not engine.idle:
        engine._iteration()
    assert "".join(e.text for e in ev[2]) == _ref(tiny_pair, PROMPTS[0], max_new_tokens=4, stop_at_eos=False)
    assert engine.stats.cancelled == 1


def test_a_failed_prefill_fails_its_requests_only(tiny_pair):
    """A prefill that raises (as an out-of-memory would) ends the requests it was for with an error;
    the rows already running go on to generate's texts."""
    engine = _engine(tiny_pair, max_batch=4)
    ev = [[], []]
    running = _request(engine, PROMPTS[1], ev[0], max_new_tokens=12, stop_at_eos=False)
    engine.submit(running)
    engine._iteration()
    engine.submit(_request(engine, PROMPTS[2], ev[1], max_new_tokens=12))
    real = engine._prefill

    def boom(cohort):
        engine._prefill = real
        raise RuntimeError("out of memory")

    engine._prefill = boom
    while not engine.idle:
        engine._iteration()
    assert [(e.finish_reason, e.error) for e in ev[1]] == [("error", "RuntimeError: out of memory")]
    assert ev[0][-1].finish_reason == "length"
    assert "".join(e.text for e in ev[0]) == _ref(tiny_pair, PROMPTS[1], max_new_tokens=12, stop_at_eos=False)
    assert engine.stats.failed == 1


def test_a_model_whose_state_cannot_join_is_refused_at_start_with_the_fix(shared_data):
    """stories260K (llama2.c) keeps a KV cache that cannot join a running batch: the server says so
    when it starts and how to serve it; with --max-batch 1 it serves generate's text."""
    from arfuse.errors import ArfuseError
    from arfuse.serve.server import ServeConfig, build_engine

    path = str(shared_data / "models/stories260K/stories260K.bin")
    with pytest.raises(ArfuseError, match="--max-batch 1") as e:
        build_engine(ServeConfig(large=path, max_batch=4))
    assert "stories260K" in str(e.value) and "cannot join a running batch" in str(e.value)
    engine, _ = build_engine(ServeConfig(large=path, max_batch=1))
    ev = []
    engine.submit(_request(engine, "Once upon a time", ev, max_new_tokens=10, temperature=0.8, seed=1))
    while not engine.idle:
        engine._iteration()
    ref = generate("Once upon a time", large=engine.models[0], max_new_tokens=10, temperature=0.8, seed=1)
    assert "".join(x.text for x in ev) == ref.text and len(ref.token_ids) >= 1


def test_a_stop_string_across_chunks_ends_the_stream_as_generate(client, tiny_pair):
    """A stop string that spans two tokens (so two chunks) is never streamed in part: the streamed
    text is generate's with that stop; every chunk carries "usage" (null but on the last)."""
    large, small = tiny_pair
    full = generate(PROMPTS[1], large=large, small=small, weight=W, max_new_tokens=30, stop_at_eos=False)
    cut = None
    for k in range(3, len(full.token_ids) - 1):
        edge = len(large.decode(full.token_ids[:k]))
        s = full.text[edge - 2:edge + 2]
        if len(s) == 4 and full.text.find(s) == edge - 2 and len(large.decode(full.token_ids[k:k + 1])) >= 2:
            cut = s
            break
    assert cut is not None
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[cut],
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    ref = generate(PROMPTS[1], large=large, small=small, weight=W, max_new_tokens=30, stop=[cut], stop_at_eos=False)
    assert "".join(texts) == ref.text == full.text[:full.text.find(cut)]
    assert len(texts) > 2 and all(cut[:2] not in t for t in texts[-2:]) or cut[:2] not in "".join(texts)[-2:]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_a_stream_whose_client_left_before_it_began_frees_its_row(live):
    """The client hangs up while the response headers are being sent: the body never starts, and the
    request still leaves the queue (it would otherwise run to max_tokens for nobody)."""
    import asyncio

    from arfuse.serve.server import create_app

    _, engine = live
    app = create_app(engine, model_name=NAME, manage_engine=False)
    body = json.dumps({"prompt": "The", "max_tokens": 200, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def call():
        sent, inbox = [], [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return inbox.pop(0) if inbox else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "http.response.start":
                await asyncio.sleep(60)     # the headers never reach the client: it is gone
        await asyncio.wait_for(app(scope, receive, send), 30)
        return sent

    cancelled = engine.stats.cancelled
    with engine.lock:   # the scheduler is held: the request is still waiting when its client leaves
        sent = asyncio.run(call())
        assert sent == ["http.response.start"] and engine.queued == 0
    assert engine.stats.cancelled == cancelled + 1


def test_a_chat_template_that_writes_bos_gets_no_second_one(client, tiny_pair, monkeypatch):
    """A template that starts with the BOS text (Llama's, Mistral's) on a tokenizer that adds BOS by
    default: the prompt has one BOS, not two, and the reply is generate's on the rendered text."""
    large, small = tiny_pair
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    for m in (large, small):
        monkeypatch.setattr(m.tokenizer, "chat_template", template)
        monkeypatch.setattr(m, "default_add_bos", True)
    from arfuse.serve.server import render_chat

    msgs = [{"role": "user", "content": "The quick brown fox"}]
    prompt = render_chat(large.tokenizer, msgs)
    ids = large.encode(prompt).ids
    assert prompt.startswith(large.tokenizer.bos_token) and ids[0] == large.bos_id and ids[1] != large.bos_id
    out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    assert out.usage.prompt_tokens == len(ids)
    ref = generate(prompt, large=large, small=small, weight=W, max_new_tokens=8, bos="never")
    assert out.choices[0].message.content == ref.text and ref.prompt_tokens == len(ids)
    plain = client.completions.create(model=NAME, prompt="The quick", max_tokens=2, temperature=0)
    assert plain.usage.prompt_tokens == len(large.encode("The quick").ids) + 1   # completions keep --bos auto


def test_a_client_that_leaves_a_non_streaming_request_frees_its_row_while_tokens_flow(live):
    """A non-streaming request whose client hangs up mid-way is cancelled within a poll, even while
    its tokens keep coming (the server does not wait for a quiet moment to look)."""
    import http.client

    url, engine = live
    cancelled = engine.stats.cancelled
    stop = threading.Event()

    def pulse():   # slow the steps to about one per 20 ms: events keep coming, the row takes seconds
        while not stop.is_set():
            with engine.lock:
                time.sleep(0.02)
            time.sleep(0.001)

    pulser = threading.Thread(target=pulse, daemon=True)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        pulser.start()
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"},
                     body=json.dumps({"model": NAME, "prompt": "The", "max_tokens": 220, "temperature": 0,
                                      "ignore_eos": True}))
        _wait(lambda: engine.active == 1 and len(engine._active[0].row.ids) >= 3, what="the row to run")
        row = engine._active[0]
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        _wait(lambda: row.cancelled.is_set(), 3, "the server to see the disconnect")
        assert len(row.row.ids) < 150
    finally:
        stop.set()
        pulser.join(5)
        conn.close()
    _wait(lambda: engine.active == 0, what="the slot to be freed")
    assert engine.stats.cancelled == cancelled + 1
