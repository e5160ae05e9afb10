"""Segments: the pieces of a text where every model's tokenization has a boundary.

Models with different tokenizers score different tokens, but each token closes a known number of
a document's UTF-8 bytes (``TokenRecords.nbytes``), so every scored token has a byte end offset in
its document. Cutting each document at the offsets where *all* models end a token gives segments
that every model scores in whole tokens: a model's log-probability of a segment is the sum of its
token log-probs inside it, and the exact mixture of the models on the text lives on these
segments, ``log(w p_L(seg) + (1 - w) p_S(seg))`` (DESIGN.md, "Across tokenizers").

Offsets come from the records alone. A document's last token ends at its total byte length
(``Encoding.ends[-1] == len(text)``, and ``nbytes`` are differences of the byte offsets of those
ends), so a token ends where the document ends less the bytes its later tokens close; that works
whether or not the first token was scored (without BOS it is not). A token that closes no byte (a
byte token holding part of a character, SentencePiece's lone dummy-prefix piece) ends inside the
next character, not at a character boundary: it belongs to the segment of the next token that
closes bytes. Boundaries are therefore at characters, as the records see them: a token that holds
part of a character after whole ones is taken to end at its last whole character.

With one tokenizer (the records' tokenizer fingerprints are equal) the tokens themselves agree,
so every token boundary is common, the byte-less ones included: each segment is one token and the
segment mixture is the token-level linear rule.

Segments start at the first common boundary at or after every model's first scored token; the
bytes before it (and whole documents some model scored nothing of) are dropped from every model
alike and counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from arfuse.errors import ArfuseError
from arfuse.scoring.records import TokenRecords

_M = 1 << 20       # a boundary's key: global byte offset * _M + _OFF + its place among byte-less tokens
_OFF = 1 << 19


@dataclass
class Segments:
    """Per segment (common boundaries of every model's tokenization), in document order.

    logp:    (K, S) float64, each model's log-probability of the segment (the sum of its tokens')
    nbytes, nchars, nwords: (S,) UTF-8 bytes, characters and words the segment closes
    doc:     (S,) the document index
    tokens:  (K,) each model's scored tokens inside the segments
    """

    names: list[str]
    logp: np.ndarray
    nbytes: np.ndarray
    nchars: np.ndarray
    nwords: np.ndarray
    doc: np.ndarray
    tokens: np.ndarray
    bytes_total: int
    bytes_covered: int
    bytes_dropped: int
    docs_dropped: int
    token_level: bool          # one tokenizer: every token boundary is common
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.logp.shape[1])

    @property
    def totals(self) -> dict:
        return {"segments": len(self), "bytes": self.bytes_covered, "bytes_dropped": self.bytes_dropped,
                "bytes_total": self.bytes_total, "documents_dropped": self.docs_dropped,
                "chars": int(self.nchars.sum()), "words": int(self.nwords.sum()),
                "tokens_per_model": dict(zip(self.names, (int(t) for t in self.tokens))),
                "token_level": self.token_level}


def doc_bytes(documents: Sequence[str]) -> np.ndarray:
    """UTF-8 byte length of each document (a lone surrogate counts 3 bytes, as the scorer counts it)."""
    return np.array([len(d.encode("utf-8", "surrogatepass")) for d in documents], np.int64)


def _sorted(rec: TokenRecords, name: str) -> TokenRecords:
    """``rec`` in (doc, pos) order, checked to hold every position from its first on in each document."""
    order = np.lexsort((rec.pos, rec.doc))
    if not np.array_equal(order, np.arange(len(order))):
        rec = TokenRecords(*(a[order] for a in rec.arrays().values()), meta=rec.meta)
    same = rec.doc[1:] == rec.doc[:-1]
    if np.any(same & (np.diff(rec.pos.astype(np.int64)) != 1)):
        raise ArfuseError(f"the records of {name} skip or repeat token positions within a document: they are "
                          "not one complete scoring of the data; rescore with --no-cache")
    return rec


def token_keys(rec: TokenRecords, totals: np.ndarray, doc_base: np.ndarray, *, token_level: bool,
               name: str = "model") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys of the rows, the start key of each document the rows reach, those documents) for records
    in (doc, pos) order.

    A row's key is the byte offset (in one global byte line, documents apart) where its token's
    segment may end: its own end, or for a token closing no byte the end of the next one that closes
    some; with ``token_level`` a byte-less token also keeps its own place (the keys then order
    every token). A document's start key is where the model's first scored token starts: the end
    of the unscored token before it (position 0, or BOS at offset 0)."""
    n = len(rec)
    doc = rec.doc.astype(np.int64)
    if n and (doc.min() < 0 or doc.max() >= len(totals)):
        raise ArfuseError(f"the records of {name} name document {int(doc.max())}, but the data has "
                          f"{len(totals):,}: they are records of other data")
    nb = rec.nbytes.astype(np.int64)
    idx = np.arange(n)
    first = np.ones(n, bool)
    first[1:] = doc[1:] != doc[:-1]
    last = np.ones(n, bool)
    last[:-1] = doc[1:] != doc[:-1]
    cum = np.cumsum(nb)
    doc_of_run = doc[first]
    cum_at_last = cum[last]
    run = np.cumsum(first) - 1                       # which document run each row is in
    end = totals[doc] - (cum_at_last[run] - cum)     # the byte offset each token ends at
    start = end[first] - nb[first]                   # where each document's first scored token starts
    bad = np.flatnonzero(start < 0)
    if len(bad):
        d = int(doc_of_run[bad[0]])
        raise ArfuseError(f"the records of {name} close {int(totals[d] - start[bad[0]]):,} bytes of document {d}, "
                          f"which holds {int(totals[d]):,}: they are records of other data; rescore with --no-cache")
    bos = bool(rec.meta.get("bos", False))
    if bos and np.any(start != 0):
        d = int(doc_of_run[np.flatnonzero(start != 0)[0]])
        raise ArfuseError(f"the records of {name} score document {d} after BOS but leave "
                          f"{int(start[np.flatnonzero(start != 0)[0]]):,} bytes before it: they are records of other "
                          "data; rescore with --no-cache")
    # the next row (same document) that closes bytes: a byte-less token's segment ends with it
    big = np.iinfo(np.int64).max
    nxt = np.minimum.accumulate(np.where(nb > 0, idx, big)[::-1])[::-1] if n else idx
    has_next = nxt < big
    has_next[has_next] &= doc[nxt[has_next]] == doc[has_next]
    G = np.where(has_next, end[np.where(has_next, nxt, 0)], end)
    if token_level:
        # byte-less tokens before a byte-closing one: -r (r tokens before it); trailing ones: +1, +2, ...
        prv = np.maximum.accumulate(np.where(nb > 0, idx, -1)) if n else idx
        run_first = idx[first][run]
        trail_from = np.where((prv >= 0) & (prv >= run_first), prv, run_first - 1)
        sub = np.where(has_next, idx - np.where(has_next, nxt, 0), idx - trail_from)
        if n and np.abs(sub).max() >= _OFF:
            raise ArfuseError(f"{name}: a run of {int(np.abs(sub).max()):,} tokens closing no byte is too long to place")
    else:
        sub = np.zeros(n, np.int64)
    base = doc_base[doc]
    keys = (base + G) * _M + _OFF + sub
    # the start: exact with BOS or where the unscored first token closes bytes (it ends at a character);
    # one closing none ends inside the first scored token's segment: with one tokenizer that is a place
    # of its own, else that whole first segment is dropped
    f = idx[first]
    if token_level:
        start_keys = np.where((start > 0) | bos, (base[f] + start) * _M + _OFF,
                              (base[f] + G[f]) * _M + _OFF + np.minimum(sub[f], 0) - 1)
    else:
        start_keys = np.where((start > 0) | bos, (base[f] + start) * _M + _OFF, keys[f])
    return keys, start_keys, doc_of_run


def segment_records(records: Sequence[TokenRecords], documents, names: Sequence[str] | None = None, *,
                    token_level: bool | None = None) -> Segments:
    """The common segments of K models' records on the same documents (a ``Dataset`` or a list of
    strings), with each model's log-probability of each segment.

    ``token_level`` (every token boundary common, byte-less tokens included) defaults to whether all
    records carry one tokenizer fingerprint in their meta."""
    if not records:
        raise ArfuseError("segment_records: no records given")
    names = list(names) if names is not None else [r.meta.get("model", f"model {i}") for i, r in enumerate(records)]
    hashes = {n: r.meta.get("data_hash") for n, r in zip(names, records)}
    known = {h for h in hashes.values() if h is not None}
    if len(known) > 1:
        which = ", ".join(f"{n} scored {h[:12] if h else '?'}" for n, h in hashes.items())
        raise ArfuseError(f"the records come from different data ({which}): segments compare models on one text; "
                          "score every model on the same data")
    docs = getattr(documents, "documents", documents)
    content_hash = getattr(documents, "content_hash", None)
    if content_hash is not None and known and content_hash not in known:
        raise ArfuseError(f"the records of {', '.join(names)} are of other data than {getattr(documents, 'name', 'the data given')}"
                          " (content hashes differ)")
    if token_level is None:
        fps = [r.meta.get("tokenizer") for r in records]
        token_level = fps[0] is not None and all(f == fps[0] for f in fps)
    totals = doc_bytes(docs)
    doc_base = np.concatenate([[0], np.cumsum(totals + 1)[:-1]]).astype(np.int64)
    K, D = len(records), len(docs)
    recs, keys, starts = [], [], np.full((K, D), -1, np.int64)
    reached = np.ones(D, bool)
    for i, (r, n) in enumerate(zip(records, names)):
        r = _sorted(r, n)
        k, sk, d = token_keys(r, totals, doc_base, token_level=token_level, name=n)
        recs.append(r)
        keys.append(k)
        starts[i, d] = sk
        seen = np.zeros(D, bool)
        seen[d] = True
        reached &= seen
    # common boundaries (each model's token ends and its start), per document after every start
    common = np.unique(np.concatenate([keys[0], starts[0][starts[0] >= 0]]))
    for k, s in zip(keys[1:], starts[1:]):
        common = np.intersect1d(common, np.concatenate([k, s[s >= 0]]), assume_unique=False)
    cdoc = np.searchsorted(doc_base, common // _M, side="right") - 1
    lo = starts.max(axis=0)
    keep = reached[cdoc] & (common >= lo[cdoc])
    common, cdoc = common[keep], cdoc[keep]
    is_first = np.ones(len(common), bool)
    is_first[1:] = cdoc[1:] != cdoc[:-1]
    ends = common[~is_first]
    seg_start = np.concatenate([[0], common[:-1]])[~is_first] if len(common) else common
    seg_doc = cdoc[~is_first]
    S = len(ends)
    # with one tokenizer a byte-less token's key sits at the next whole character: count tokens' bytes
    nbytes = None if token_level else ends // _M - seg_start // _M
    logp = np.zeros((K, S), np.float64)
    tokens = np.zeros(K, np.int64)
    nchars = nwords = None
    for i, (r, k, n) in enumerate(zip(recs, keys, names)):
        j = np.searchsorted(ends, k, side="left")
        inside = j < S
        inside[inside] &= k[inside] > seg_start[j[inside]]
        j = j[inside]
        logp[i] = np.bincount(j, weights=r.logp[inside].astype(np.float64), minlength=S)
        tokens[i] = len(j)
        b = np.bincount(j, weights=r.nbytes[inside], minlength=S).astype(np.int64)
        c = np.bincount(j, weights=r.nchars[inside], minlength=S).astype(np.int64)
        w = np.bincount(j, weights=r.nwords[inside], minlength=S).astype(np.int64)
        if nbytes is None:
            nbytes = b
        if not np.array_equal(b, nbytes) or (nwords is not None and not np.array_equal(w, nwords)):
            raise ArfuseError(f"the tokens of {n} do not fill the common segments byte for byte: its records do not "
                              "match the data's text; rescore with --no-cache")
        if nchars is None:
            nchars, nwords = c, w
    covered = int(nbytes.sum())
    total = int(totals.sum())
    return Segments(names=list(names), logp=logp, nbytes=nbytes, nchars=nchars, nwords=nwords,
                    doc=seg_doc.astype(np.int32), tokens=tokens,
                    bytes_total=total, bytes_covered=covered, bytes_dropped=total - covered,
                    docs_dropped=int((~reached).sum()), token_level=bool(token_level),
                    meta={"data_hash": next(iter(known), None)})
