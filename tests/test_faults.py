"""Faults: whatever a user types or feeds, the CLI gives a result or one line that names the fix.

Property-based (hypothesis) inputs: random bytes and random text as data files, random slices,
random option values, against `score`, `eval`, `task` and `generate` through the CLI entry point
in-process, with the tiny models of conftest.py. Each outcome must be exit 0, or exit 2 with one
line on standard error: never another exception, exit code or a traceback. The number of cases
run is printed at the end of the module (and written to $ARFUSE_FAULTS_LOG when set).

Then kill -9: `arfuse score` and `arfuse train` killed with SIGKILL at a random moment resume to
records / weights identical to a clean run.

Cases are derandomized (the same every run) unless ARFUSE_FAULTS_RANDOM=1; ARFUSE_FAULTS_SCALE=N
multiplies the number of examples (for a longer hunt).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT  # noqa: E402
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arfuse.cli.main import main  # noqa: E402

CASES: Counter = Counter()
OUTCOMES: Counter = Counter()
FAULTS: list[str] = []
SCALE = max(1, int(os.environ.get("ARFUSE_FAULTS_SCALE", "1")))


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, database=None,
                    derandomize=os.environ.get("ARFUSE_FAULTS_RANDOM", "") in ("", "0"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    # transformers was imported (by conftest) before main() could set HF_HUB_DISABLE_PROGRESS_BARS: its
    # per-load bars would land on stderr in-process (a fresh `arfuse` process shows none)
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()
    line = (f"test_faults: {sum(CASES.values())} generated cases ("
            + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())) + f"), {len(FAULTS)} tracebacks")
    line += "; outcomes: " + ", ".join(f"{k} x{v}" for k, v in sorted(OUTCOMES.items()))
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    if rep is not None:
        rep.ensure_newline()
        rep.write_line(line)
    if os.environ.get("ARFUSE_FAULTS_LOG"):
        with open(os.environ["ARFUSE_FAULTS_LOG"], "a") as f:
            f.write(line + "\n")


def run_cli(kind: str, argv: list[str]) -> tuple[int, str, str]:
    """One case through the entry point: (exit code, stdout, stderr); any other outcome fails."""
    CASES[kind] += 1
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library warnings are not the CLI's errors
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage errors
            code = e.code
        except BaseException:
            FAULTS.append(f"{kind}: {argv!r}")
            raise
    out, err = out.getvalue(), err.getvalue()
    OUTCOMES[f"{kind} exit {code}"] += 1
    if os.environ.get("ARFUSE_FAULTS_VERBOSE"):
        sys.__stderr__.write(f"{kind} {code} {err.strip().splitlines()[-1] if err.strip() else ''}\n")
    return code, out, err


def check(kind: str, argv: list[str]) -> tuple[int, str]:
    code, out, err = run_cli(kind, argv)
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("arfuse: warning:")]
        ok = code == 2 and len(lines) == 1 and "Traceback" not in err and "error:" in lines[0]
        if not ok:
            FAULTS.append(f"{kind}: {argv!r} -> exit {code}: {err.strip()[-400:]}")
        assert ok, f"exit {code} for {argv!r}:\n{err}"
    return code, out


# ---- building blocks --------------------------------------------------------------------------
INT = st.one_of(st.integers(2, 300), st.integers(-3, 600))
NUM = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                st.sampled_from(["0", "1", "0.5", "-0", "1e-320", "nan", "-inf", "2", "0.999999"]))
SLICE_BOUND = st.one_of(st.just(""), st.integers(0, 800).map(str), st.integers(0, 100).map(lambda v: f"{v}%"),
                        st.integers(-50, 4000).map(str), st.integers(-20, 130).map(lambda v: f"{v}%"),
                        st.text(alphabet="0123456789%.-x ", max_size=5))


@st.composite
def slices(draw) -> str:
    if draw(st.booleans()):
        return ""
    sep = draw(mostly(st.just(":"), st.sampled_from(["", "::"])))
    return "[" + draw(SLICE_BOUND) + sep + draw(SLICE_BOUND) + "]"


def opt(name: str, values) -> st.SearchStrategy[list[str]]:
    """Absent, or NAME=VALUE (the = form: argparse reads a bare -inf after an option as an option)."""
    return st.one_of(st.just([]), values.map(lambda v: [f"{name}={v}"]))


def mostly(valid, wild) -> st.SearchStrategy:
    """Valid values three times in four, anything else the rest."""
    return st.one_of(valid, valid, valid, wild)


W = mostly(st.floats(0, 1).map(repr), NUM)


def flags(*parts) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda t: [x for p in t for x in p])


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("fz") / "small.txt"
    p.write_text(TRAIN_TEXT[:700], encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory) -> str:
    lines = [ln.strip() for ln in TRAIN_TEXT[:400].split(".") if len(ln.split()) > 2][:8]
    p = tmp_path_factory.mktemp("fz") / "lambada.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return str(p)


# ---- score: options and data ------------------------------------------------------------------
SCORE_OPTS = flags(opt("--window", INT), opt("--stride", INT), opt("--topk", st.integers(-2, 400)),
                   opt("--batch-size", st.integers(-2, 9)), opt("--convention", st.sampled_from(["sliding", "disjoint"])),
                   opt("--bos", st.sampled_from(["auto", "always", "never"])),
                   st.sampled_from([[], ["--no-cache"]]))


@fuzz(40)
@given(o=SCORE_OPTS)
def test_score_options(tiny_models, small_text, o):
    code, out = check("score", ["score", tiny_models["large"], small_text, "--quiet", "--json", *o])
    if code == 0:
        assert json.loads(out)["tokens"] > 0


@fuzz(40)
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8"))),
       suffix=mostly(st.just(".txt"), st.sampled_from([".jsonl", ".bz2", ""])), sl=mostly(st.just(""), slices()),
       o=flags(opt("--bos", st.sampled_from(["always", "never"])), opt("--window", st.integers(1, 40))))
def test_score_random_data(tiny_models, tmp_path_factory, payload, suffix, sl, o):
    p = tmp_path_factory.mktemp("d") / f"data{suffix}"
    p.write_bytes(payload)
    check("score-data", ["score", tiny_models["small"], f"{p}{sl}", "--quiet", "--json", "--no-cache", *o])


@fuzz(25)
@given(sl=slices())
def test_score_random_slices(tiny_models, small_text, sl):
    check("score-slice", ["score", tiny_models["small"], small_text + sl, "--quiet", "--no-cache",
                          "--window", "32", "--convention", "disjoint"])


# ---- eval ---------------------------------------------------------------------------------------
@fuzz(25)
@given(o=flags(st.one_of(st.just([]), W.map(lambda v: [f"--weight={v}"]),
                         st.text(alphabet="0123456789.,-e ", max_size=12).map(lambda v: [f"--weights={v}"])),
               opt("--window", st.integers(-2, 300)), opt("--stride", st.integers(-2, 300)),
               opt("--topk", st.integers(-1, 50)), opt("--batch-size", st.integers(-1, 6)),
               opt("--rule", st.sampled_from(["linear", "cosine", "union", "max", "prodcut"])),
               st.sampled_from([[], ["--small", "SMALL2"]]), st.sampled_from([[], ["--valid", "VALID"]])),
       valid_slice=st.sampled_from(["[:50%]", "[10%:3%]", "[:300]", ""]))
def test_eval_options(tiny_models, small_text, o, valid_slice):
    o = [tiny_models["small2"] if x == "SMALL2" else small_text + valid_slice if x == "VALID" else x for x in o]
    check("eval", ["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", small_text,
                   "--quiet", "--json", *o])


# ---- task ---------------------------------------------------------------------------------------
@fuzz(20)
@given(o=flags(opt("--limit", st.integers(-1, 10)),
               opt("--valid-split", st.one_of(st.sampled_from(["none", "0:20%", "0:2", "2:1", "50%:", ":"]),
                                              st.text(alphabet="0123456789%:-", max_size=6))),
               opt("--weight", W),
               opt("--topk", st.integers(-1, 50)), opt("--batch-size", st.integers(-1, 6)),
               opt("--small-context-words", st.integers(-1, 6)),
               st.sampled_from([[], ["--small", "SMALL"]])),
       data=mostly(st.just(None), st.binary(max_size=200)))
def test_task_options(tiny_models, lambada_file, tmp_path_factory, o, data):
    o = [tiny_models["small"] if x == "SMALL" else x for x in o]
    path = lambada_file
    if data is not None:
        path = str(tmp_path_factory.mktemp("t") / "task.jsonl")
        Path(path).write_bytes(data)
    check("task", ["task", "lambada", "--large", tiny_models["large"], "--data", path, "--quiet", "--json", *o])


# ---- generate -----------------------------------------------------------------------------------
@fuzz(30)
@given(prompt=st.text(max_size=40),
       o=flags(opt("--max-new-tokens", mostly(st.integers(1, 12), st.integers(-2, 0))),
               opt("--temperature", mostly(st.floats(0, 3).map(repr), NUM)),
               opt("--top-p", mostly(st.floats(0.01, 1).map(repr), NUM)),
               opt("--top-k", st.integers(-2, 400)), opt("--seed", st.integers(-5, 2**40)),
               mostly(W.map(lambda v: [f"--weight={v}"]), st.just([])),
               st.sampled_from([[], ["--speculative=auto"], ["--speculative=2"], ["--speculative=0"]]),
               st.sampled_from([[], ["--strategy", "segment"], ["--truncate", "left"], ["--bos", "always"]]),
               opt("--stop", st.text(max_size=3))))
def test_generate_options(tiny_models, prompt, o):
    check("generate", ["generate", "--large", tiny_models["large"], "--small", tiny_models["small"], *o,
                       "--json", "--", prompt])


# ---- the error channel itself -------------------------------------------------------------------
def test_errors_are_one_line_and_debug_shows_the_traceback(tiny_models, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["score", tiny_models["small"], str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "UTF-8" in err and "Traceback" not in err
    monkeypatch.setenv("ARFUSE_DEBUG", "1")
    assert main(["score", tiny_models["small"], str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("arfuse score: error:")


def test_report_error_kinds(capsys):
    from arfuse.cli.main import report_error
    from arfuse.errors import ArfuseError

    cases = [(ArfuseError("bad value 3:\n use 4"), 2, "arfuse x: error: bad value 3: use 4"),
             (FileNotFoundError(2, "No such file or directory", "/nope/a.txt"), 2, "/nope/a.txt: no such file"),
             (PermissionError(13, "Permission denied", "/root/x"), 2, "/root/x: permission denied"),
             (KeyboardInterrupt(), 130, "interrupted"),
             (ValueError("boom"), 1, "internal error: ValueError: boom (rerun with ARFUSE_DEBUG=1")]
    for exc, code, needle in cases:
        assert report_error(exc, "x") == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_window_and_stride_defaults_fit_the_model(tiny_models, small_text, capsys):
    """The tiny models' context is 256: no --window means 256 with stride 128; a --window alone
    gets half of it as stride; a window too long names the context and the fix."""
    assert main(["score", tiny_models["small"], small_text, "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windowing"].startswith("sliding window 256, stride 128")
    assert main(["score", tiny_models["small"], small_text, "--quiet", "--json", "--window", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["windowing"].startswith("sliding window 40, stride 20")
    assert main(["score", tiny_models["small"], small_text, "--quiet", "--window", "1024"]) == 2
    err = capsys.readouterr().err
    assert "--window 1024 exceeds" in err and "use --window 256 or less" in err
    assert main(["score", tiny_models["small"], small_text, "--quiet", "--stride", "300"]) == 2
    err = capsys.readouterr().err
    assert "--stride 300 must be between 1 and the window, 256" in err and "--stride 128" in err
    assert main(["eval", "--large", tiny_models["large"], "--small", tiny_models["small"], "--data", small_text,
                 "--quiet", "--json", "--weight", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["windowing"].startswith("sliding window 256, stride 128")


# ---- kill -9 and resume -------------------------------------------------------------------------
def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "arfuse.cli.main", *args]


def _env(cache: Path) -> dict:
    return {**os.environ, "ARFUSE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_score_killed_at_a_random_moment_resumes_to_identical_records(tiny_models, tmp_path):
    from arfuse.adapters import load_model
    from arfuse.data.text import load_dataset
    from arfuse.scoring.scorer import CHUNK_TARGETS, ScoreConfig, score

    rng = random.Random(int(os.environ.get("ARFUSE_FAULTS_SEED", "0")) or None)
    words = TRAIN_TEXT.split()
    text = " ".join(words[(i * 7919 + i // 3) % len(words)] for i in range(36000))  # several cache chunks
    data = tmp_path / "big.txt"
    data.write_text(text, encoding="utf-8")
    model = tiny_models["small"]
    opts = ["--window", "64", "--convention", "disjoint", "--bos", "never", "--batch-size", "16", "--quiet"]
    cfg = ScoreConfig(window=64, stride=32, convention="disjoint", bos="never")

    killed = tmp_path / "killed-cache"
    proc = subprocess.Popen(_cli("score", model, str(data), *opts), env=_env(killed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(killed.glob("scores/*")):
        time.sleep(0.01)   # scoring has begun (its cache entry exists)
    time.sleep(rng.uniform(0.0, 1.5))
    was_running = proc.poll() is None
    if was_running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_chunks_before = len(list(killed.glob("scores/*/chunk_*")))
    # the rerun resumes from what survived
    rerun = subprocess.run(_cli("score", model, str(data), *opts), env=_env(killed), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    clean = tmp_path / "clean-cache"
    straight = subprocess.run(_cli("score", model, str(data), *opts), env=_env(clean), capture_output=True,
                              text=True)
    assert straight.returncode == 0, straight.stderr

    m, ds = load_model(model), load_dataset(str(data))
    recs = []
    for cache in (killed, clean):
        os.environ["ARFUSE_CACHE"] = str(cache)   # restored by conftest's monkeypatch after the test
        recs.append(score(m, ds, cfg, progress=False))
    a, b = recs
    assert len(a) > 2 * CHUNK_TARGETS, "the text should span several cache chunks"
    for f in ("doc", "pos", "target", "logp", "topk_ids", "topk_logp", "nbytes", "nchars", "nwords"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    print(f"score killed {'after %d chunk(s)' % n_chunks_before if was_running else '(had finished)'}; resumed "
          f"records identical over {len(a):,} tokens")


def test_train_killed_at_a_random_moment_resumes_to_identical_weights(tmp_path):
    rng = random.Random(int(os.environ.get("ARFUSE_FAULTS_SEED", "0")) or None)
    text = tmp_path / "train.txt"
    text.write_text(TRAIN_TEXT, encoding="utf-8")
    valid = tmp_path / "valid.txt"
    valid.write_text(TRAIN_TEXT[:400], encoding="utf-8")
    base = {"arch": "lstm", "data": str(text), "valid": str(valid), "tokenizer": "word", "embed_size": 16,
            "hidden_size": 16, "block_size": 8, "batch_size": 4, "grad_accum": 1, "max_steps": 300,
            "eval_every": 150, "checkpoint_every": 7, "lr": 1e-2, "dropout": 0.2, "threads": 1}

    def args(out: Path) -> list[str]:
        return _cli("train", "--quiet", *[x for k, v in {**base, "out": str(out)}.items() for x in ("--set", f"{k}={v}")])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args(killed), env=_env(tmp_path / "c"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints").exists():
        time.sleep(0.01)   # training has begun
    time.sleep(rng.uniform(0.0, 1.0))
    was_running = proc.poll() is None
    if was_running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for out in (killed, tmp_path / "straight"):
        r = subprocess.run(args(out), env=_env(tmp_path / "c"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a, b = (json.loads((p / "arfuse.json").read_text()) for p in (killed, tmp_path / "straight"))
    assert a["status"] == b["status"] != "training"
    assert (killed / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()
    print(f"train {'killed' if was_running else 'had finished before the kill'}; rerun: weights identical")
