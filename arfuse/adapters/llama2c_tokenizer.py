"""llama2.c's tokenizer .bin and its sentencepiece-style BPE, exactly as llama2.c encodes.

Layout: int32 max_token_length, then for each of the model's vocab_size tokens a float32 merge
score, an int32 byte length and the token's bytes. Ids 0, 1, 2 are <unk>, <s>, </s>; ids
3..258 are the byte-fallback tokens <0x00>..<0xFF>.
"""
from __future__ import annotations

import heapq
import re
import struct
from itertools import chain
from pathlib import Path

import numpy as np

from arfuse.adapters.base import Encoding
from arfuse.errors import ArfuseError

BOS_ID, EOS_ID = 1, 2
BYTE_FALLBACK_OFFSET = 3      # llama2.c: byte b is token b + 3 (after <unk>, <s>, </s>)
MIN_MERGE_SCORE = -1e10       # llama2.c's initial best score: a merge must score above it
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style BPE: per-codepoint tokens (byte fallback for the rest),
    then repeatedly merge the adjacent pair whose merged piece scores best (leftmost on ties).

    Exactness at speed. llama2.c rescans the whole sequence after every merge, O(n^2): hours
    for a megabyte. Two things make this exact and fast:

    1. A heap of candidate pairs keyed by (-score, left position), entries checked when
       popped, and a linked list of live tokens: each step pops the same best-scoring,
       leftmost pair that llama2.c's scan picks (the original position of a pair's left
       token orders the pairs as their current positions do), so any chunk, however long,
       merges in O(n log n) with llama2.c's result.
    2. The text is cut into chunks between adjacent characters a, b where no vocabulary
       piece contains the last byte of a's initial piece followed by the first byte of b's
       (a byte-fallback piece "<0xXX>" starts with '<' and ends with '>'). Every token of
       more than one initial piece is a vocabulary piece, so no token can ever span such a
       cut; pairs across it never merge, and the global greedy order restricted to one
       chunk is that chunk's own greedy order (the global best pair is also the best and
       leftmost in its chunk). Encoding chunks separately is therefore identical, and
       repeated chunks (words) are memoised. For tok512 the cuts fall before every space
       that follows a non-space and around characters that need byte fallback (newlines).

    Differences from llama2.c only where llama2.c has none to offer: a NUL character (C
    stops there) and lone surrogates are byte-encoded instead.
    """

    def __init__(self, pieces: list[bytes], scores: list[float], path: str | None = None):
        self.pieces = pieces
        self.scores = scores
        self.path = path
        self.vocab_size = len(pieces)
        self.piece_to_id: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self.piece_to_id.setdefault(p, i)  # a repeated piece maps to its first id (tok512 has none)
        # Raw bytes each id decodes to: byte-fallback pieces become their byte, specials nothing.
        self.raw: list[bytes] = []
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.fullmatch(p)
            self.raw.append(bytes([int(m.group(1), 16)]) if m else b"" if i in (BOS_ID, EOS_ID) else p)
        self.byte_fallback = self.vocab_size >= BYTE_FALLBACK_OFFSET + 256 and all(
            pieces[BYTE_FALLBACK_OFFSET + b] == b"<0x%02X>" % b for b in range(256))
        # bigram[x, y]: some piece has byte x right before byte y (a token could span an x|y cut)
        self.bigram = np.zeros((256, 256), dtype=bool)
        for p in pieces:
            if len(p) > 1:
                arr = np.frombuffer(p, dtype=np.uint8)
                self.bigram[arr[:-1], arr[1:]] = True
        self._atoms_memo: dict[str, tuple[int, ...]] = {}
        self._chunk_memo: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int) -> Llama2cTokenizer:
        """Read a llama2.c tokenizer .bin holding ``vocab_size`` tokens (the model's header says how many)."""
        path = Path(path)
        if not path.is_file():
            raise ArfuseError(f"llama2.c tokenizer {path} does not exist: check the path")
        data = path.read_bytes()
        pieces, scores, off = [], [], 4
        try:
            for _ in range(vocab_size):
                score, n = struct.unpack_from("<fi", data, off)
                if n < 0 or off + 8 + n > len(data):
                    raise struct.error
                pieces.append(data[off + 8:off + 8 + n])
                scores.append(score)
                off += 8 + n
        except struct.error:
            raise ArfuseError(f"{path} ends after {len(pieces)} of the model's {vocab_size} tokens: "
                              "it is truncated or belongs to a model with a smaller vocabulary") from None
        if off != len(data):
            raise ArfuseError(f"{path} has {len(data) - off:,} bytes after the model's {vocab_size} tokens: "
                              "it belongs to a model with a larger vocabulary; pass the model's own tokenizer")
        return cls(pieces, scores, path=str(path))

    # ---- encode ------------------------------------------------------------------------
    def _atoms(self, ch: str) -> tuple[int, ...]:
        """Initial token ids of one character: its own piece, else one byte token per UTF-8 byte."""
        atoms = self._atoms_memo.get(ch)
        if atoms is None:
            b = ch.encode("utf-8", "surrogatepass")
            if b in self.piece_to_id:
                atoms = (self.piece_to_id[b],)
            elif self.byte_fallback:
                atoms = tuple(x + BYTE_FALLBACK_OFFSET for x in b)
            else:
                raise ArfuseError(f"character {ch!r} is not in the vocabulary of {self.path} and this tokenizer has "
                                  "no byte-fallback tokens: remove or replace the character")
            self._atoms_memo[ch] = atoms
        return atoms

    def _chunk_starts(self, stream: str) -> list[int]:
        """Character offsets where a chunk may start, 0 first (see the class docstring)."""
        if len(stream) < 2:
            return [0]
        cps = np.frombuffer(stream.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        uniq, inv = np.unique(cps, return_inverse=True)
        first = np.empty(len(uniq), dtype=np.uint8)
        last = np.empty(len(uniq), dtype=np.uint8)
        for k, cp in enumerate(uniq.tolist()):
            atoms = self._atoms(chr(cp))
            first[k] = self.pieces[atoms[0]][0]
            last[k] = self.pieces[atoms[-1]][-1]
        inv = inv.reshape(-1)
        cut = ~self.bigram[last[inv[:-1]], first[inv[1:]]]  # (n-1,): cut between char i and i+1
        return [0] + (np.flatnonzero(cut) + 1).tolist()

    def _merge(self, ids: list[int], ends: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """llama2.c's greedy merge loop, with a heap and a linked list instead of rescans."""
        n = len(ids)
        if n < 2:
            return tuple(ids), tuple(ends)
        ids, ends = list(ids), list(ends)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        pieces, lookup, scores = self.pieces, self.piece_to_id, self.scores

        def candidate(i: int, j: int):
            m = lookup.get(pieces[ids[i]] + pieces[ids[j]])
            if m is not None and scores[m] > MIN_MERGE_SCORE:
                return (-scores[m], i, j, ids[i], ids[j], m)
            return None

        heap = [c for i in range(n - 1) if (c := candidate(i, i + 1)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, j, left, right, m = heapq.heappop(heap)
            if not alive[i] or nxt[i] != j or ids[i] != left or ids[j] != right:
                continue  # stale: one side merged since this pair was pushed
            ids[i], ends[i] = m, ends[j]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            if prv[i] >= 0 and (c := candidate(prv[i], i)) is not None:
                heapq.heappush(heap, c)
            if nxt[i] < n and (c := candidate(i, nxt[i])) is not None:
                heapq.heappush(heap, c)
        out_ids, out_ends, i = [], [], 0
        while i < n:
            out_ids.append(ids[i])
            out_ends.append(ends[i])
            i = nxt[i]
        return tuple(out_ids), tuple(out_ends)

    def _encode_chunk(self, chunk: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of a chunk and the number of its characters each token completes."""
        hit = self._chunk_memo.get(chunk)
        if hit is not None:
            return hit
        ids: list[int] = []
        ends: list[int] = []
        for k, ch in enumerate(chunk):
            atoms = self._atoms(ch)
            ids.extend(atoms)
            ends.extend([k] * (len(atoms) - 1) + [k + 1])  # only a character's last byte completes it
        out = self._merge(ids, ends)
        if len(self._chunk_memo) > 200_000:
            self._chunk_memo.clear()
        self._chunk_memo[chunk] = out
        return out

    def encode(self, text: str) -> Encoding:
        """llama2.c's encode without BOS/EOS: a dummy-prefix space, then BPE. ``ends`` index ``text``;
        the dummy space belongs to no character, so a token holding only it closes nothing."""
        if not text:
            return Encoding([], [])
        stream = " " + text
        starts = self._chunk_starts(stream)
        parts = [self._encode_chunk(stream[a:b]) for a, b in zip(starts, starts[1:] + [len(stream)])]
        ids = list(chain.from_iterable(p[0] for p in parts))
        rel = np.fromiter(chain.from_iterable(p[1] for p in parts), dtype=np.int64, count=len(ids))
        counts = np.fromiter((len(p[0]) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.repeat(np.asarray(starts, dtype=np.int64), counts) - 1  # -1: the dummy prefix
        ends = (rel + offsets).clip(min=0).tolist()
        return Encoding(ids, ends)

    # ---- decode ------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; like llama2.c, the first piece and a piece right after BOS lose one
        leading space (the dummy prefix), BOS/EOS print nothing, bad UTF-8 becomes U+FFFD."""
        out = bytearray()
        prev = BOS_ID
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ArfuseError(f"token id {t} is outside the vocabulary (0..{self.vocab_size - 1})")
            raw = self.raw[t]
            if prev == BOS_ID and self.pieces[t].startswith(b" "):
                raw = raw[1:]
            out += raw
            prev = t
        return out.decode("utf-8", errors="replace")


def find_tokenizer(checkpoint: Path, vocab_size: int) -> Path:
    """``tok<vocab>.bin`` or ``tokenizer.bin`` beside the checkpoint."""
    tried = [checkpoint.parent / f"tok{vocab_size}.bin", checkpoint.parent / "tokenizer.bin"]
    for p in tried:
        if p.is_file():
            return p
    raise ArfuseError(f"no tokenizer found for {checkpoint} (looked for {' and '.join(str(p) for p in tried)}): "
                      "pass the llama2.c tokenizer .bin with tokenizer=... (--tokenizer on the command line)")
