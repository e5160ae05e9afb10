"""Cache faults (issue 21): a damaged, missing or unwritable cache never loses work nor ends in a traceback.

Every fault is reproduced on a finished cache entry of a tiny model; the rerun must warn (one
CacheWarning) and give records equal, field by field, to a run without the cache.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arfuse.adapters import load_model
from arfuse.data.text import load_dataset
from arfuse.errors import ArfuseError
from arfuse.scoring import cache as cache_mod
from arfuse.scoring import scorer as scorer_mod
from arfuse.scoring.cache import CacheWarning, ScoreCache
from arfuse.scoring.records import FIELDS
from arfuse.scoring.scorer import ScoreConfig, cache_key_fields, score

CFG = ScoreConfig(window=48, stride=16, convention="sliding", bos="never", topk=8)
CHUNK = 300  # targets per chunk here: a few chunks from a short text
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on 2 cores
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Entry:
    """A finished cache entry, its pristine bytes, and the records of a run without the cache."""

    def __init__(self, model, data):
        self.model, self.data = model, data
        self.clean = score(model, data, CFG, use_cache=False, progress=False)
        first = score(model, data, CFG, progress=False)
        assert_same(first, self.clean)
        self.dir = ScoreCache(cache_key_fields(model, data, CFG, False)).dir
        self.files = sorted(p.name for p in self.dir.iterdir())
        assert self.files[-1] == "manifest.json" and len(self.files) >= 4, self.files
        self.pristine = {name: (self.dir / name).read_bytes() for name in self.files}

    def restore(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        for name, raw in self.pristine.items():
            (self.dir / name).write_bytes(raw)

    def rerun_warns(self, **kw):
        """Rerun: exactly the faults are warned about, the records equal the clean run, and the
        entry is healed (a second rerun is silent and still equal)."""
        with pytest.warns(CacheWarning) as got:
            rec = score(self.model, self.data, CFG, progress=False, **kw)
        assert_same(rec, self.clean)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            assert_same(score(self.model, self.data, CFG, progress=False), self.clean)
        return [str(w.message) for w in got if issubclass(w.category, CacheWarning)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for f in FIELDS:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


@pytest.fixture
def entry(tiny_models, text_file, monkeypatch):
    monkeypatch.setattr(scorer_mod, "CHUNK_TARGETS", CHUNK)
    return Entry(load_model(tiny_models["large"]), load_dataset(text_file + "[:2500]"))


def _flip(raw: bytes, positions: list[int], masks: list[int]) -> bytes:
    b = bytearray(raw)
    for p, x in zip(positions, masks):
        b[p % len(b)] ^= x
    return bytes(b)


# ---- the manifest -------------------------------------------------------------------------
def test_manifest_with_invalid_utf8_is_rescored(entry):
    """The reported fault: a few bytes flipped so that manifest.json is not UTF-8 any more
    (before the fix: a UnicodeDecodeError traceback on every rerun)."""
    path = entry.dir / "manifest.json"
    raw = bytearray(path.read_bytes())
    for p in (3, len(raw) // 2, len(raw) - 3):
        raw[p] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UnicodeDecodeError):
        path.read_text(encoding="utf-8")
    msgs = entry.rerun_warns()
    assert msgs == [f"score cache {entry.dir} has an unreadable manifest (not UTF-8): rescoring"]


def test_manifest_of_older_arfuse_without_self_checksum(entry):
    """A manifest written before the self-checksum (no 'sha256' field) is still read; one that
    is not UTF-8, or that promises fewer chunks than it holds, is rescored (before the fix, a
    chunk count edited down returned a silently shorter set of records)."""
    path = entry.dir / "manifest.json"
    legacy = json.loads(path.read_bytes())
    del legacy["sha256"]
    path.write_text(json.dumps(legacy, indent=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert_same(score(entry.model, entry.data, CFG, progress=False), entry.clean)
    path.write_bytes(json.dumps(legacy, indent=1).encode().replace(b'"version"', b'"v\xffrsion"'))
    assert "not UTF-8" in entry.rerun_warns()[0]
    entry.restore()
    path.write_text(json.dumps(dict(legacy, n_chunks=1), indent=1))
    assert "a damaged chunk count" in entry.rerun_warns()[0]
    entry.restore()
    last = legacy["n_chunks"] - 1
    path.write_text(json.dumps(dict(legacy, n_chunks=last, chunks={i: d for i, d in legacy["chunks"].items()
                                                                  if int(i) < last}), indent=1))
    lost = int(np.load(io.BytesIO(entry.pristine[f"chunk_{last:05d}.npz"]))["logp"].shape[0])
    total = len(entry.clean)
    assert entry.rerun_warns() == [(f"score cache {entry.dir} holds {total - lost:,} records where its manifest "
                                    f"promises {total:,}: rescoring")]


# ---- random flips, truncations and deletions of every file of an entry -----------------------
@FAST
@given(data=st.data())
def test_flipped_bytes_in_any_file(entry, data):
    for name in entry.files:
        raw = entry.pristine[name]
        n = data.draw(st.integers(1, 4), label=f"{name} flips")
        positions = data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=n, max_size=n, unique=True), label="at")
        masks = data.draw(st.lists(st.integers(1, 255), min_size=n, max_size=n), label="xor")
        entry.restore()
        (entry.dir / name).write_bytes(_flip(raw, positions, masks))
        msgs = entry.rerun_warns()
        assert len(msgs) == 1 and msgs[0].endswith("rescoring it, never using it" if name != "manifest.json"
                                                   else "rescoring"), (name, msgs)


@FAST
@given(data=st.data())
def test_truncated_file(entry, data):
    for name in entry.files:
        raw = entry.pristine[name]
        keep = data.draw(st.integers(0, len(raw) - 1), label=f"{name} keeps")
        entry.restore()
        (entry.dir / name).write_bytes(raw[:keep])
        msgs = entry.rerun_warns()
        assert len(msgs) == 1, (name, keep, msgs)


def test_deleted_file(entry):
    for name in entry.files:
        entry.restore()
        (entry.dir / name).unlink()
        msgs = entry.rerun_warns()
        if name == "manifest.json":
            assert msgs == [f"score cache {entry.dir} has chunk files but no manifest.json: rescoring"]
        else:
            assert msgs == [f"score cache chunk {entry.dir / name} is missing: rescoring it, never using it"]


@FAST
@given(data=st.data())
def test_several_faults_at_once(entry, data):
    entry.restore()
    for name in data.draw(st.lists(st.sampled_from(entry.files), min_size=1, max_size=len(entry.files), unique=True)):
        path, raw = entry.dir / name, entry.pristine[name]
        kind = data.draw(st.sampled_from(["flip", "truncate", "delete"]), label=name)
        if kind == "delete":
            path.unlink()
        elif kind == "truncate":
            path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        else:
            path.write_bytes(_flip(raw, [data.draw(st.integers(0, len(raw) - 1))], [data.draw(st.integers(1, 255))]))
    assert entry.rerun_warns()


# ---- an unwritable cache ----------------------------------------------------------------
def _count_forwards(monkeypatch) -> dict:
    calls = {"n": 0}
    real = scorer_mod._score_windows

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(scorer_mod, "_score_windows", counted)
    return calls


def test_cache_under_a_file_is_refused_before_any_work(tiny_models, text_file, tmp_path, monkeypatch):
    m, data = load_model(tiny_models["small"]), load_dataset(text_file)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("ARFUSE_CACHE", str(tmp_path / "a-file" / "cache"))
    calls = _count_forwards(monkeypatch)
    with pytest.raises(ArfuseError) as e:
        score(m, data, CFG, progress=False)
    assert calls["n"] == 0
    msg = str(e.value)
    assert msg.startswith(f"the score cache folder {tmp_path / 'a-file' / 'cache' / 'scores'}/")
    assert msg.endswith("cannot be written (Not a directory): score without the cache with --no-cache, "
                        "or set ARFUSE_CACHE=<a writable folder>")
    # and --no-cache works there
    assert len(score(m, data, CFG, use_cache=False, progress=False)) > 0 and calls["n"] > 0


def test_read_only_cache_is_refused_before_any_work(tiny_models, text_file, tmp_path, monkeypatch):
    m, data = load_model(tiny_models["small"]), load_dataset(text_file)
    root = tmp_path / "ro"
    (root / "scores").mkdir(parents=True)
    monkeypatch.setenv("ARFUSE_CACHE", str(root))
    os.chmod(root / "scores", stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(root / "scores", os.W_OK):   # root ignores permission bits: refuse the write ourselves
            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(cache_mod.tempfile, "mkstemp", refuse)
        calls = _count_forwards(monkeypatch)
        with pytest.raises(ArfuseError, match=r"cannot be written \(Permission denied\): score without the cache "
                                              r"with --no-cache, or set ARFUSE_CACHE=<a writable folder>"):
            score(m, data, CFG, progress=False)
        assert calls["n"] == 0
    finally:
        os.chmod(root / "scores", stat.S_IRWXU)


def test_write_failing_mid_run_keeps_the_records(entry, monkeypatch):
    """A disk that fills up after the check: one warning, the run finishes from memory."""
    shutil.rmtree(entry.dir)
    n = {"writes": 0}
    real = cache_mod._atomic_write_bytes

    def full_after_two(path, data):
        n["writes"] += 1
        if n["writes"] > 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(cache_mod, "_atomic_write_bytes", full_after_two)
    with pytest.warns(CacheWarning) as got:
        rec = score(entry.model, entry.data, CFG, progress=False)
    assert_same(rec, entry.clean)
    assert [str(w.message) for w in got] == [
        (f"score cache {entry.dir} cannot be written (No space left on device): the records of this run are kept "
         "in memory but not cached; to cache them, free the space or set ARFUSE_CACHE=<a writable folder> "
         "(or use --no-cache)")]
    # the next run resumes from the one chunk that was saved
    monkeypatch.setattr(cache_mod, "_atomic_write_bytes", real)
    assert_same(score(entry.model, entry.data, CFG, progress=False), entry.clean)
    # with load=False nothing else keeps the records: an error, not a silent loss
    shutil.rmtree(entry.dir)
    n["writes"] = 0
    monkeypatch.setattr(cache_mod, "_atomic_write_bytes", full_after_two)
    with pytest.warns(CacheWarning), pytest.raises(ArfuseError, match="load=False"):
        score(entry.model, entry.data, CFG, progress=False, load=False)


# ---- resuming says so ----------------------------------------------------------------------
def test_resume_says_what_it_reused(entry, capfd):
    last = entry.files[-2]
    (entry.dir / last).unlink()
    capfd.readouterr()
    with pytest.warns(CacheWarning, match="is missing"):
        assert_same(score(entry.model, entry.data, CFG, progress=True), entry.clean)
    err = capfd.readouterr().err
    n = len(entry.files) - 1
    rescored = int(np.load(io.BytesIO(entry.pristine[last]))["logp"].shape[0])
    total = len(entry.clean)
    line = f"resuming: {n - 1} of {n} chunks ({total - rescored:,} of {total:,} tokens) from the cache"
    assert err.splitlines()[0] == line, err
    # quiet (progress=False) says nothing
    (entry.dir / last).unlink()
    with pytest.warns(CacheWarning):
        score(entry.model, entry.data, CFG, progress=False)
    assert capfd.readouterr().err == ""


def test_cache_warning_is_one_line():
    """Printed by Python (outside pytest), a cache warning is one line: no file name, no source
    line; other warnings keep Python's format."""
    code = ("import warnings; from arfuse.scoring.cache import cache_warning; "
            "cache_warning('score cache /x fails its checksum: rescoring'); warnings.warn('other')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stderr.splitlines()
    assert lines[0] == "arfuse: warning: score cache /x fails its checksum: rescoring"
    assert "UserWarning: other" in lines[1]
