"""The on-disk score cache: one folder per key, chunk files written atomically.

Layout: ``<cache_root>/scores/<key>/manifest.json`` and ``chunk_00000.npz`` ...
The manifest names the cache format version, every field of the key, and each finished
chunk's SHA-256. A chunk is used only when its checksum verifies; otherwise it is
rescored (with a warning). A manifest from another format version is discarded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from arfuse.adapters.base import fingerprint_json
from arfuse.paths import cache_root
from arfuse.scoring.records import FIELDS, TokenRecords

CACHE_VERSION = 1


class CacheWarning(UserWarning):
    pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class ScoreCache:
    """The chunks already scored for one key."""

    def __init__(self, key_fields: dict, root: Path | None = None):
        self.key_fields = key_fields
        self.key = fingerprint_json(key_fields) + fingerprint_json([CACHE_VERSION, key_fields])[:8]
        self.dir = (root or cache_root() / "scores") / self.key
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        fresh = {"version": CACHE_VERSION, "key": self.key_fields, "chunks": {}, "complete": False}
        if not self.manifest_path.exists():
            return fresh
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"score cache {self.dir} has an unreadable manifest: rescoring", CacheWarning, stacklevel=3)
            shutil.rmtree(self.dir, ignore_errors=True)
            return fresh
        if m.get("version") != CACHE_VERSION or m.get("key") != json.loads(json.dumps(self.key_fields, default=str)):
            warnings.warn(f"score cache {self.dir} was written by another arfuse cache version "
                          f"({m.get('version')} != {CACHE_VERSION}) or for another key: rescoring",
                          CacheWarning, stacklevel=3)
            shutil.rmtree(self.dir, ignore_errors=True)
            return fresh
        return m

    def _save_manifest(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=1, default=str).encode())

    def chunk_path(self, i: int) -> Path:
        return self.dir / f"chunk_{i:05d}.npz"

    def load_chunk(self, i: int) -> TokenRecords | None:
        """The records of chunk ``i``, or None when absent or when its checksum fails."""
        digest = self.manifest["chunks"].get(str(i))
        path = self.chunk_path(i)
        if digest is None or not path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            warnings.warn(f"score cache chunk {path} fails its checksum: rescoring it, never using it",
                          CacheWarning, stacklevel=2)
            del self.manifest["chunks"][str(i)]
            self.manifest["complete"] = False
            return None
        with np.load(io.BytesIO(data)) as z:
            return TokenRecords(*(z[f] for f in FIELDS))

    def save_chunk(self, i: int, rec: TokenRecords) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **rec.arrays())
        data = buf.getvalue()
        _atomic_write_bytes(self.chunk_path(i), data)
        self.manifest["chunks"][str(i)] = hashlib.sha256(data).hexdigest()
        self._save_manifest()

    def mark_complete(self, n_chunks: int, summary: dict) -> None:
        self.manifest.update(complete=True, n_chunks=n_chunks, summary=summary)
        self._save_manifest()
