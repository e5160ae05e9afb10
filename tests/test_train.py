"""arfuse train: tiny models, real text; determinism, kill -9 resume, loading through the
adapters, and the errors for bad input. The whole file runs in well under a minute."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from arfuse.errors import ArfuseError
from arfuse.train import TrainConfig, train

TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And the Spirit of God moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
) * 40
VALID = ("And God called the light Day, and the darkness he called Night.\n"
         "And the evening and the morning were the first day, in Zarephath.\n")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text(TEXT)
    (d / "valid.txt").write_text(VALID)
    return str(d / "train.txt"), str(d / "valid.txt")


def tiny(texts, out: Path, **kw) -> TrainConfig:
    base = dict(arch="transformer", data=texts[0], valid=texts[1], tokenizer="word", n_layers=1, n_heads=2,
                embed_size=16, ffn_size=32, block_size=16, batch_size=4, grad_accum=2, max_steps=12, lr=1e-2,
                dropout=0.1, threads=1, eval_every=4, out=str(out))
    base.update(kw)
    return TrainConfig.resolve(base)


def quiet(*a, **k):
    pass


# ---- determinism and resumption ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_same_seed_gives_bit_identical_checkpoint(texts, tmp_path, arch):
    a, b, c = (train(tiny(texts, tmp_path / name, arch=arch, seed=seed, max_steps=30, eval_every=10),
                     progress=False, log=quiet) for name, seed in (("a", 42), ("b", 42), ("c", 7)))
    wa, wb, wc = ((r.path / "model.safetensors").read_bytes() for r in (a, b, c))
    assert wa == wb
    assert wa != wc
    assert (a.path / "arfuse.json").read_bytes() == (b.path / "arfuse.json").read_bytes()
    assert a.val_loss == b.val_loss and a.val_loss != c.val_loss
    # it learned: the training loss fell well below the uniform distribution's log(V)
    hist = a.meta["history"]
    assert hist[-1]["train_loss"] < min(hist[0]["train_loss"], math.log(a.meta["vocab"]["full_size"])) - 0.3


def _resume_cfg(texts, out: Path) -> TrainConfig:
    return tiny(texts, out, arch="lstm", embed_size=32, hidden_size=32, block_size=8, batch_size=4, grad_accum=1,
                max_steps=400, eval_every=200, checkpoint_every=10, dropout=0.2)


def test_kill_9_then_rerun_resumes_to_the_same_result(texts, tmp_path):
    killed = tmp_path / "killed"
    cfg = _resume_cfg(texts, killed)
    args = [sys.executable, "-m", "arfuse.cli.main", "train", "--quiet"]
    for k, v in cfg.to_dict().items():
        if v is not None:
            args += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = killed / "checkpoints"
    deadline = time.time() + 60
    step = 0
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckdir.glob("step-*") if ".tmp" not in p.name] if ckdir.exists() else []
        if done:
            step = max(int(p.name[5:]) for p in done)
            if step >= 20:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed: {proc.stderr.read()}"
    assert json.loads((killed / "arfuse.json").read_text())["status"] == "training"
    assert not (killed / "model.safetensors").exists()

    resumed = train(cfg, progress=False, log=quiet)
    straight = train(_resume_cfg(texts, tmp_path / "straight"), progress=False, log=quiet)
    assert 20 <= resumed.resumed_from < 400
    assert resumed.step == straight.step == 400
    assert resumed.val_loss == straight.val_loss
    assert (resumed.path / "model.safetensors").read_bytes() == (straight.path / "model.safetensors").read_bytes()
    # a rerun of a finished run trains nothing
    again = train(cfg, progress=False, log=quiet)
    assert again.already_done and again.val_loss == straight.val_loss


# ---- checkpoints load and score through the adapters ---------------------------------------
def _score_ppl(folder: Path, valid: str, window: int) -> float:
    from arfuse.adapters import load_model
    from arfuse.scoring.scorer import ScoreConfig, score
    from arfuse.data.text import load_dataset

    model = load_model(str(folder))
    # the trainer validates on consecutive blocks: the "blocks" convention (what "disjoint" was before it
    # took lm-eval's prefix token and last-window cut)
    rec = score(model, load_dataset(valid), ScoreConfig(window=window, convention="blocks"), use_cache=False,
                progress=False)
    return float(np.exp(-rec.logp.astype(np.float64).mean())), model


@pytest.mark.parametrize("arch,tokenizer", [("lstm", "word"), ("gru", "gpt2"), ("transformer", "gpt2")])
def test_checkpoint_scores_as_the_trainer_validated(texts, tmp_path, shared_data, arch, tokenizer):
    """The exported model, loaded by path, scores the validation text exactly as training measured it
    (with a compact vocabulary too: the GPT-2 runs train 40-odd of 50,257 rows)."""
    cfg = tiny(texts, tmp_path / arch, arch=arch, tokenizer=tokenizer, block_size=64, eval_batch_size=1,
               embed_size=16, hidden_size=16, max_steps=6, eval_every=6)
    res = train(cfg, progress=False, log=quiet)
    ppl, model = _score_ppl(res.path, texts[1], window=64)
    assert ppl == pytest.approx(res.val_ppl, rel=1e-5)
    assert model.num_parameters == res.num_parameters
    meta = json.loads((res.path / "arfuse.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == model.tokenizer_fingerprint()
    if tokenizer == "gpt2":
        assert model.info.vocab_size == 50257
        assert meta["vocab"]["compact"] and meta["vocab"]["trained_rows"] < 200
        # "Zarephath" never occurs in the training text: the shared slot still gives it a finite score
        assert meta["vocab"]["unseen_tokens"] > 0
    if arch == "transformer":  # its output layer repeats the shared row: generation computes each row once
        from arfuse.adapters.kernels import shared_rows
        from arfuse.generation.api import generate

        assert shared_rows(model.output_layer()).distinct == meta["vocab"]["trained_rows"]
        on, off = (generate("And the light", large=model, max_new_tokens=8, stop_at_eos=False, fast_kernels=f)
                   for f in (True, False))
        assert len(on.token_ids) == 8 and on.token_ids == off.token_ids
    else:
        assert model.info.kind == "arfuse" and model.info.max_length is None


def test_fused_eval_with_trained_models(texts, tmp_path):
    from arfuse.tasks import EvalConfig, evaluate
    from arfuse.scoring.scorer import ScoreConfig

    big = train(tiny(texts, tmp_path / "big", embed_size=32, max_steps=30, eval_every=30), progress=False, log=quiet)
    small = train(tiny(texts, tmp_path / "small", arch="lstm", embed_size=8, hidden_size=8, block_size=16,
                       max_steps=30, eval_every=30), progress=False, log=quiet)
    rep = evaluate(EvalConfig(large=str(big.path), smalls=[str(small.path)], data=texts[1],
                              score=ScoreConfig(window=16, stride=8)), progress=False)
    fused = next(r for r in rep.rows if r.kind == "fused")
    assert 0.0 < rep.weights[0] <= 1.0
    assert fused.gain_pct >= -1e-9  # the weight is fitted on this data: never worse than the LLM alone
    assert rep.param_ratio[0] == pytest.approx(big.num_parameters / small.num_parameters)


# ---- bad input -----------------------------------------------------------------------------
def test_unknown_architecture(texts, tmp_path):
    with pytest.raises(ArfuseError, match=r"unknown architecture 'transfomer'.*Did you mean 'transformer'"):
        tiny(texts, tmp_path / "x", arch="transfomer")
    from arfuse.cli.main import main

    assert main(["train", "--arch", "rnn", "--data", texts[0], "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_tokenizer_not_found(texts, tmp_path):
    with pytest.raises(ArfuseError, match=r"tokenizer .*nope/tokenizer.json does not exist"):
        train(tiny(texts, tmp_path / "x", tokenizer=str(tmp_path / "nope" / "tokenizer.json")), log=quiet)
    with pytest.raises(ArfuseError, match=r"unknown tokenizer 'gpt3'.*Did you mean 'gpt2'"):
        train(tiny(texts, tmp_path / "x", tokenizer="gpt3"), log=quiet)
    assert not (tmp_path / "x").exists()


def test_corpus_too_small_for_one_batch(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("and the light\n" * 30)
    cfg = TrainConfig.resolve(dict(arch="lstm", data=str(small), valid=str(small), tokenizer="word",
                                   out=str(tmp_path / "x")))
    with pytest.raises(ArfuseError, match=r"gives 120 training tokens, fewer than one batch needs "
                                          r"\(batch_size 20 x \(block_size 35 \+ 1\) = 720\)"):
        train(cfg, log=quiet)
    assert not (tmp_path / "x").exists()


def test_output_folder_with_another_run_is_left_alone(texts, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    train(tiny(texts, out, max_steps=4, data=str(data)), progress=False, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ArfuseError, match=r"holds a different run \(it differs in lr 0.01 vs 0.001"):
        train(tiny(texts, out, max_steps=4, data=str(data), lr=1e-3), log=quiet)
    data.write_text(TEXT + "And it was so.\n")  # same options, other text
    with pytest.raises(ArfuseError, match=r"holds a run on other inputs \(train data"):
        train(tiny(texts, out, max_steps=4, data=str(data)), log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArfuseError, match=r"already holds files that are not an arfuse training run \(notes.txt"):
        train(tiny(texts, other), log=quiet)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_unfinished_run_does_not_load(texts, tmp_path):
    from arfuse.adapters import load_model

    out = tmp_path / "run"
    out.mkdir()
    (out / "arfuse.json").write_text(json.dumps({"format": "arfuse-train/1", "status": "training", "step": 3,
                                                 "total_steps": 10}))
    with pytest.raises(ArfuseError, match=r"has not finished \(step 3 of 10\).*resume"):
        load_model(str(out))


# ---- configuration -------------------------------------------------------------------------
def test_presets_file_and_overrides(tmp_path):
    t = TrainConfig.resolve({"arch": "transformer", "data": "kjv"})
    assert (t.n_layers, t.n_heads, t.embed_size, t.ffn_size, t.block_size) == (6, 6, 384, 1536, 1024)
    assert (t.lr, t.batch_size, t.grad_accum, t.warmup, t.grad_clip, t.schedule) == (5e-5, 2, 4, 0.1, 1.0, "cosine")
    g = TrainConfig.resolve({"arch": "gru", "data": "kjv"})
    assert (g.hidden_size, g.n_layers, g.dropout, g.lr, g.batch_size, g.epochs, g.optimizer, g.block_size) == \
        (128, 1, 0.2, 1e-3, 20, 5.0, "adam", 35)
    f = tmp_path / "c.toml"
    f.write_text('arch = "lstm"\ndata = "kjv"\nembed_size = 512\nlr = 0.002\n')
    c = TrainConfig.resolve({"lr": "3e-4", "tie_weights": "false"}, file=f)
    assert (c.arch, c.embed_size, c.lr, c.hidden_size) == ("lstm", 512, 3e-4, 128)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"arch": "transformer-small", "data": "kjv", "embed_size": 16}))
    s = TrainConfig.resolve(file=j)
    assert (s.n_layers, s.n_heads, s.block_size, s.embed_size) == (1, 2, 35, 16)
    with pytest.raises(ArfuseError, match=r"embed_size = 'big' is not a valid int"):
        TrainConfig.resolve({"arch": "lstm", "data": "kjv", "embed_size": "big"})
    with pytest.raises(ArfuseError, match=r"embed_size = 100: must be a multiple of n_heads \(6\)"):
        TrainConfig.resolve({"arch": "transformer", "data": "kjv", "embed_size": 100})


def test_word_tokenizer_is_the_papers_vocabulary():
    from arfuse.train.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer("b a c a\nb a d\n", max_vocab=10_000, min_freq=2)
    vocab = tok.hf.get_vocab()
    assert vocab == {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}
    enc = tok.hf("a c\nb", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == [2, 0, 1, 3]
    assert enc["offset_mapping"] == [(0, 1), (2, 3), (3, 4), (4, 5)]
    capped = build_word_tokenizer("x x y y y z z z z\n", max_vocab=4, min_freq=1)
    assert list(capped.hf.get_vocab()) == ["<unk>", "<eos>", "z", "y"] or set(capped.hf.get_vocab()) == {
        "<unk>", "<eos>", "z", "y"}


def test_wikitext_markup_is_stripped():
    from arfuse.train.corpus import strip_wikitext

    wiki = ("'''Anarchism''' is a [[political philosophy|philosophy]]{{sfn|Woodcock|1962}} that"
            "<ref>Kropotkin, ''Anarchism''.</ref> rejects rulers.\n\n== History ==\n"
            "{| class=\"wikitable\"\n|-\n| cell || other\n|}\n"
            "[[File:Flag.svg|thumb|A flag]]Early forms existed.\n[[Category:Political ideologies]]\n[[de:Anarchismus]]")
    assert strip_wikitext(wiki) == "Anarchism is a philosophy that rejects rulers.\nHistory\nEarly forms existed."
