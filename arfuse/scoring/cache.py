"""The on-disk score cache: one folder per key, chunk files written atomically.

Layout: ``<cache_root>/scores/<key>/manifest.json`` and ``chunk_00000.npz`` ...
The manifest names the cache format version, every field of the key, and each finished
chunk's SHA-256; its first field is the SHA-256 of its own bytes (with that field zeroed), so
a manifest altered on disk in any byte is noticed. A chunk is used only when its checksum
verifies; otherwise it is rescored (with a warning). A manifest that is unreadable, damaged
or from another format version is discarded with a warning and its entry rescored.

The folder must be writable: opening an entry that still has work to do checks this first
(an ``ArfuseError`` naming the folder and the fixes, before any scoring). A write that fails
later (a full disk) is a warning: the run keeps its records in memory and finishes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from arfuse.adapters.base import fingerprint_json
from arfuse.errors import ArfuseError
from arfuse.paths import cache_root
from arfuse.scoring.records import FIELDS, TokenRecords

CACHE_VERSION = 1
_DIGEST_HEAD = b'{\n "sha256": "'   # how every manifest written since the self-checksum begins
_ZEROS = b"0" * 64
_FIELDS = {"version", "key", "chunks", "complete", "n_chunks", "summary"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIXES = "score without the cache with --no-cache, or set ARFUSE_CACHE=<a writable folder>"


class CacheWarning(UserWarning):
    """A damaged or unwritable cache entry; the run goes on (rescoring, or keeping records in memory)."""


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"arfuse: warning: {message}\n"


def cache_warning(message: str, stacklevel: int = 2) -> None:
    """Warn with a CacheWarning, shown as one line (no Python source line) when it is printed."""
    orig = warnings.formatwarning
    warnings.formatwarning = _one_line   # only while this warning is shown; every other warning keeps its format
    try:
        warnings.warn(message, CacheWarning, stacklevel=stacklevel + 1)
    finally:
        warnings.formatwarning = orig


def resume_note(n_reused: int, n_chunks: int, done: int, total: int, unit: str = "tokens", *,
                enabled: bool = True) -> None:
    """The one stderr line of a run that resumes from cached chunks (silent when ``enabled`` is False)."""
    if enabled and n_reused:
        print(f"resuming: {n_reused:,} of {n_chunks:,} chunks ({done:,} of {total:,} {unit}) from the cache",
              file=sys.stderr, flush=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _manifest_bytes(manifest: dict) -> bytes:
    """The manifest as JSON whose first field is the SHA-256 of these bytes with that field zeroed."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    raw = json.dumps({"sha256": _ZEROS.decode(), **body}, indent=1, default=str).encode()
    assert raw.startswith(_DIGEST_HEAD + _ZEROS)
    return _DIGEST_HEAD + hashlib.sha256(raw).hexdigest().encode() + raw[len(_DIGEST_HEAD) + 64:]


def _parse_manifest(raw: bytes) -> tuple[dict | None, str]:
    """The JSON object in ``raw``, or None and why it is none."""
    if not raw.strip():
        return None, "empty"
    try:
        m = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(m, dict):
        return None, "not a JSON object"
    return m, ""


def _integrity_problem(raw: bytes, m: dict) -> str:
    """'' when the manifest's bytes are what was written (or it predates the self-checksum)."""
    n = len(_DIGEST_HEAD)
    if raw.startswith(_DIGEST_HEAD) and raw[n + 64:n + 65] == b'"':
        if raw[n:n + 64] != hashlib.sha256(_DIGEST_HEAD + _ZEROS + raw[n + 64:]).hexdigest().encode():
            return "its bytes fail its checksum"
    elif "sha256" in m:   # a self-checked manifest whose first bytes were altered
        return "its checksum field is damaged"
    return ""


def _structure_problem(m: dict) -> str:
    """What makes a parsed manifest of this version unusable, or ''."""
    if set(m) - _FIELDS:
        return f"unknown fields {sorted(set(m) - _FIELDS)}"
    chunks = m.get("chunks")
    if not isinstance(chunks, dict) or not all(
            isinstance(i, str) and i.isdigit() and isinstance(d, str) and _HEX64.fullmatch(d) for i, d in chunks.items()):
        return "a damaged list of chunks"
    if not isinstance(m.get("complete"), bool):
        return "a damaged 'complete' flag"
    if m["complete"]:
        n = m.get("n_chunks")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or any(int(i) >= n for i in chunks):
            return "a damaged chunk count"
    summary = m.get("summary", {})
    if not isinstance(summary, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in summary.values()):
        return "a damaged summary"
    return ""


class ScoreCache:
    """The chunks already scored for one key.

    Opening an entry with work left to do checks that its folder can be written, raising an
    ArfuseError that names the folder and the fixes (before any scoring work).
    """

    def __init__(self, key_fields: dict, root: Path | None = None):
        self.key_fields = key_fields
        self.key = fingerprint_json(key_fields) + fingerprint_json([CACHE_VERSION, key_fields])[:8]
        self.dir = (root or cache_root() / "scores") / self.key
        self.manifest_path = self.dir / "manifest.json"
        self.writable = True   # False once a write failed: the rest of the run keeps its records in memory
        self.manifest = self._read_manifest()
        if not self.manifest.get("complete"):
            self._check_writable()

    def _fresh(self) -> dict:
        return {"version": CACHE_VERSION, "key": self.key_fields, "chunks": {}, "complete": False}

    def _discard(self, why: str) -> dict:
        cache_warning(f"score cache {self.dir} {why}: rescoring", stacklevel=4)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self._fresh()

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            if self.dir.is_dir() and any(self.dir.glob("chunk_*.npz")):
                return self._discard("has chunk files but no manifest.json")
            return self._fresh()
        try:
            raw = self.manifest_path.read_bytes()
        except OSError as e:
            return self._discard(f"has an unreadable manifest ({e.strerror or e})")
        m, why = _parse_manifest(raw)
        if m is None:
            return self._discard(f"has an unreadable manifest ({why})")
        if m.get("version") != CACHE_VERSION:   # first: another version may lay its manifest out otherwise
            return self._discard(f"was written by another arfuse cache version ({m.get('version')} != "
                                 f"{CACHE_VERSION})")
        why = _integrity_problem(raw, m)
        if why:
            return self._discard(f"has an unreadable manifest ({why})")
        m.pop("sha256", None)
        if m.get("key") != json.loads(json.dumps(self.key_fields, default=str)):
            return self._discard("was written for another key (the same folder name, other key fields)")
        why = _structure_problem(m)
        if why:
            return self._discard(f"has an unreadable manifest ({why})")
        return m

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=self.dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ArfuseError(f"the score cache folder {self.dir} cannot be written "
                              f"({e.strerror or type(e).__name__}): {_FIXES}") from e

    def _write(self, path: Path, data: bytes) -> bool:
        """Write atomically; on failure warn once, stop writing for this run, and return False."""
        if not self.writable:
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(path, data)
            return True
        except OSError as e:
            self.writable = False
            cache_warning(f"score cache {self.dir} cannot be written ({e.strerror or type(e).__name__}): "
                          "the records of this run are kept in memory but not cached; to cache them, "
                          "free the space or set ARFUSE_CACHE=<a writable folder> (or use --no-cache)", stacklevel=4)
            return False

    def _save_manifest(self) -> bool:
        return self._write(self.manifest_path, _manifest_bytes(self.manifest))

    def chunk_path(self, i: int) -> Path:
        return self.dir / f"chunk_{i:05d}.npz"

    def _drop(self, i: int, why: str) -> None:
        cache_warning(f"score cache chunk {self.chunk_path(i)} {why}: rescoring it, never using it", stacklevel=4)
        del self.manifest["chunks"][str(i)]
        self.manifest["complete"] = False

    def load_chunk(self, i: int) -> TokenRecords | None:
        """The records of chunk ``i``, or None when absent or damaged (with a warning when the manifest lists it)."""
        digest = self.manifest["chunks"].get(str(i))
        if digest is None:
            return None
        path = self.chunk_path(i)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._drop(i, "is missing")
            return None
        except OSError as e:
            self._drop(i, f"is unreadable ({e.strerror or e})")
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self._drop(i, "fails its checksum")
            return None
        try:
            with np.load(io.BytesIO(data)) as z:
                return TokenRecords(*(z[f] for f in FIELDS))
        except Exception as e:  # noqa: BLE001 - the checksum held, but the file never was a chunk
            self._drop(i, f"cannot be read ({type(e).__name__})")
            return None

    def save_chunk(self, i: int, rec: TokenRecords) -> bool:
        """Cache chunk ``i``; False when the cache could not be written (warned once; nothing is lost)."""
        buf = io.BytesIO()
        np.savez(buf, **rec.arrays())
        data = buf.getvalue()
        if not self._write(self.chunk_path(i), data):
            return False
        self.manifest["chunks"][str(i)] = hashlib.sha256(data).hexdigest()
        return self._save_manifest()

    def mark_complete(self, n_chunks: int, summary: dict) -> bool:
        if not self.writable:
            return False
        self.manifest.update(complete=True, n_chunks=n_chunks, summary=summary)
        return self._save_manifest()
