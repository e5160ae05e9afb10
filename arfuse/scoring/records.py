"""Per-token records: what one model said about each scored token of a data set."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("doc", "pos", "target", "logp", "topk_ids", "topk_logp", "nbytes", "nchars", "nwords")


@dataclass
class TokenRecords:
    """One row per scored position (all documents, in order).

    doc, pos:    document index and the target's index in that document's token sequence
    target:      the target token id; logp its float32 log-probability
    topk_ids, topk_logp: the model's k most likely tokens there, best first
    nbytes, nchars, nwords: UTF-8 bytes, characters and words the target token closes
    """

    doc: np.ndarray
    pos: np.ndarray
    target: np.ndarray
    logp: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    nbytes: np.ndarray
    nchars: np.ndarray
    nwords: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.logp.shape[0])

    @classmethod
    def concat(cls, parts: list["TokenRecords"], meta: dict | None = None) -> "TokenRecords":
        if not parts:
            return cls.empty(0, meta)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS), meta=meta or {})

    @classmethod
    def empty(cls, k: int, meta: dict | None = None) -> "TokenRecords":
        z = lambda dt: np.zeros(0, dt)  # noqa: E731
        return cls(z(np.int32), z(np.int32), z(np.int32), z(np.float32), np.zeros((0, k), np.int32),
                   np.zeros((0, k), np.float32), z(np.int32), z(np.int32), z(np.int32), meta=meta or {})

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    @property
    def totals(self) -> dict[str, int]:
        return {"tokens": len(self), "bytes": int(self.nbytes.sum()), "chars": int(self.nchars.sum()),
                "words": int(self.nwords.sum())}
