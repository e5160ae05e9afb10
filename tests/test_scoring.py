import json
import warnings

import numpy as np
import pytest
import torch

from arfuse.adapters import load_model
from arfuse.errors import ArfuseError
from arfuse.scoring import scorer as scorer_mod
from arfuse.scoring.cache import CacheWarning, ScoreCache
from arfuse.scoring.scorer import ScoreConfig, cache_key_fields, score
from arfuse.data.text import Dataset, load_dataset

CFG = ScoreConfig(window=48, stride=16, convention="sliding", bos="never", topk=8)


def test_records_match_a_direct_forward_pass(tiny_models, text_file):
    m = load_model(tiny_models["large"])
    data = load_dataset(text_file)
    rec = score(m, data, CFG, progress=False)
    ids = torch.tensor(m.encode(data.documents[0]).ids)
    assert len(rec) == len(ids) - 1
    assert np.array_equal(rec.target, ids[1:].numpy())
    # the first window: positions 1..47 predicted from the first 47 tokens
    lp = m.logprobs(ids[None, :47])[0]
    np.testing.assert_allclose(rec.logp[:46], lp[:-1].gather(1, ids[1:47, None])[:, 0].numpy(), atol=1e-5)
    top = lp[0].topk(8)
    assert np.array_equal(rec.topk_ids[0], top.indices.numpy())
    # bytes, characters and words add up to the text less the unscored first token
    text = data.documents[0]
    first = m.decode(ids[:1].tolist())
    assert rec.nchars.sum() == len(text) - len(first)
    assert rec.nbytes.sum() == len(text.encode()) - len(first.encode())
    assert rec.nwords.sum() == len(text.split()) - (1 if text[len(first)].isspace() else 0)


def test_batch_one_equals_batch_eight(tiny_models, text_file):
    m = load_model(tiny_models["large"])
    data = load_dataset(text_file)
    r1 = score(m, data, CFG, batch_size=1, use_cache=False, progress=False)
    r8 = score(m, data, CFG, batch_size=8, use_cache=False, progress=False)
    assert np.array_equal(r1.target, r8.target)
    np.testing.assert_allclose(r1.logp, r8.logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r1.topk_logp, r8.topk_logp, atol=1e-5, rtol=0)


def test_both_conventions_score_every_token_once(tiny_models, text_file):
    m = load_model(tiny_models["small"])
    data = load_dataset(text_file)
    n = len(m.encode(data.documents[0]).ids)
    for conv in ("sliding", "disjoint"):
        # disjoint reads lm-eval's prefix token first, so the text's first token (and a BOS after the
        # prefix, as lm-eval scores it) is scored too: one more target than sliding, at positions 1..
        lead = int(conv == "disjoint")
        for bos, n_scored in (("never", n - 1 + lead), ("always", n + lead)):
            rec = score(m, data, ScoreConfig(window=40, stride=10, convention=conv, bos=bos, topk=4), progress=False)
            assert len(rec) == n_scored
            assert np.array_equal(rec.pos, np.arange(1, n_scored + 1))


def test_cache_is_keyed_by_model(tiny_models, text_file):
    data = load_dataset(text_file)
    a, b = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    ra, rb = score(a, data, CFG, progress=False), score(b, data, CFG, progress=False)
    assert ra.meta["cache_key"] != rb.meta["cache_key"]
    assert not np.array_equal(ra.logp, rb.logp)
    # reading back gives each model its own scores
    assert np.array_equal(score(a, data, CFG, progress=False).logp, ra.logp)
    assert np.array_equal(score(b, data, CFG, progress=False).logp, rb.logp)
    # and every field that changes a score changes the key
    base = cache_key_fields(a, data, CFG, False)
    for other in (cache_key_fields(a, data, ScoreConfig(window=40, stride=16, bos="never", topk=8), False),
                  cache_key_fields(a, data, ScoreConfig(window=48, stride=8, bos="never", topk=8), False),
                  cache_key_fields(a, data, ScoreConfig(window=48, stride=16, bos="never", topk=4), False),
                  cache_key_fields(a, data, CFG, True),
                  cache_key_fields(a, Dataset("x", [data.documents[0] + "!"], "x"), CFG, False)):
        assert ScoreCache(other).key != ScoreCache(base).key


def test_interrupted_run_resumes(tiny_models, text_file, monkeypatch):
    m = load_model(tiny_models["large"])
    data = load_dataset(text_file + "[:2500]")
    monkeypatch.setattr(scorer_mod, "CHUNK_TARGETS", 100)
    full = score(m, data, CFG, use_cache=False, progress=False)
    calls = {"n": 0}
    real = scorer_mod._score_windows

    def crash_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scorer_mod, "_score_windows", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        score(m, data, CFG, progress=False)
    calls["n"] = -100  # no more crashes; count what the resumed run scores
    resumed = score(m, data, CFG, progress=False)
    n_chunks = len(list(ScoreCache(cache_key_fields(m, data, CFG, False)).dir.glob("chunk_*.npz")))
    assert calls["n"] == -100 + n_chunks - 2      # the two finished chunks were not rescored
    assert np.array_equal(resumed.logp, full.logp)


def test_corrupt_chunk_is_rescored_never_used(tiny_models, text_file):
    m = load_model(tiny_models["large"])
    data = load_dataset(text_file)
    good = score(m, data, CFG, progress=False)
    cache = ScoreCache(cache_key_fields(m, data, CFG, False))
    chunk = cache.chunk_path(0)
    raw = bytearray(chunk.read_bytes())
    raw[-20] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.warns(CacheWarning, match="checksum"):
        again = score(m, data, CFG, progress=False)
    assert np.array_equal(again.logp, good.logp)
    # a manifest from another cache version is discarded
    man = json.loads(cache.manifest_path.read_text())
    man["version"] = 0
    cache.manifest_path.write_text(json.dumps(man))
    with pytest.warns(CacheWarning, match="another arfuse cache version"):
        again = score(m, data, CFG, progress=False)
    assert np.array_equal(again.logp, good.logp)


def test_finished_cache_is_read_without_tokenizing(tiny_models, text_file, monkeypatch):
    m = load_model(tiny_models["large"])
    data = load_dataset(text_file)
    cfg = ScoreConfig(window=40, stride=13, bos="never", topk=5)
    first = score(m, data, cfg, progress=False)

    def no_tokenizing(*a, **k):
        raise AssertionError("a finished cache must not tokenize the data again")

    monkeypatch.setattr(m, "encode", no_tokenizing)
    again = score(m, data, cfg, progress=False)
    for f in ("doc", "pos", "target", "logp", "topk_ids", "topk_logp", "nbytes", "nchars", "nwords"):
        assert np.array_equal(getattr(again, f), getattr(first, f)), f
    assert again.meta["windowing"] == first.meta["windowing"] and again.meta["cache_key"] == first.meta["cache_key"]


def test_nan_output_names_model_and_position(tiny_models, text_file):
    m = load_model(tiny_models["small"], reuse=False)
    with torch.no_grad():
        m.model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(ArfuseError, match=r"NaN or inf .* document 0, token position 1"):
        score(m, load_dataset(text_file), CFG, progress=False, use_cache=False)


def test_window_longer_than_context(tiny_models, text_file):
    m = load_model(tiny_models["small"])
    with pytest.raises(ArfuseError, match="exceeds .* context of 256"):
        score(m, load_dataset(text_file), ScoreConfig(window=1024, stride=512), progress=False)


def test_cache_warning_is_a_warning_not_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CacheWarning):
            warnings.warn("x", CacheWarning)


def test_tokenizer_fingerprint_ignores_padding_and_truncation():
    """transformers switches padding on in the backend tokenizer for padding=True: same tokens, same hash."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from arfuse.adapters.base import backend_fingerprint, fingerprint_json

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    before = backend_fingerprint(tok)
    assert before == fingerprint_json(tok.to_str())      # unchanged for a plain tokenizer (cache keys stay)
    tok.enable_padding(direction="left", pad_id=0, pad_token="<unk>")
    tok.enable_truncation(max_length=8)
    assert backend_fingerprint(tok) == before
    assert tok.padding is not None                       # the caller's settings are left as they were
    other = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "c": 2}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert backend_fingerprint(other) != before
