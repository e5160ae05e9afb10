"""Feed one model a growing text a piece at a time, so that its cache (KV or recurrent state)
survives: only the newly appended text is tokenised, alone, as a continuation (``encode_piece``).

Used by fusion across models with different tokenizers: each step appends the chosen token's
bytes to the text; a model whose own token it was is fed that token, the others the piece of
text it stands for, tokenised by their own tokenizers.
"""
from __future__ import annotations

from arfuse.adapters.token_bytes import byte_token_ids


def _byte_ids(model) -> list[int | None]:
    ids = model.__dict__.get("_byte_token_ids")
    if ids is None:
        ids = model.__dict__["_byte_token_ids"] = byte_token_ids(model.token_bytes())
    return ids


class TextExtender:
    """One model's tokens for a growing text, for one batch row.

    ``extend(data)`` appends bytes and returns the ids to feed for them now; what cannot be fed yet
    stays in ``pending``: an incomplete UTF-8 character at the end (until the rest of it arrives)
    and, for word-level tokenizers, an unfinished last word (until whitespace follows it).
    Invariant (byte-level BPE, SentencePiece with byte fallback):
    ``b"".join(token_bytes[i] for i in fed_ids) + pending == all bytes appended``.
    Bytes that can never become valid UTF-8 are fed as byte tokens, or as U+FFFD text where the
    vocabulary has no token for one of them (GPT-NeoX and SmolLM2 lack 0xC0, 0xC1, 0xF5-0xFF, which
    UTF-8 never uses; word-level vocabularies have no byte tokens at all).
    """

    __slots__ = ("_boundary", "_byte_ids", "_encode", "_has_bytes", "fed_ids", "model", "pending", "token_bytes")

    def __init__(self, model):
        self.model = model
        self.token_bytes = model.token_bytes()
        self.pending = b""
        self.fed_ids: list[int] = []
        self._encode = model.encode_piece
        self._boundary = model.piece_boundary
        self._byte_ids = _byte_ids(model)
        self._has_bytes = any(i is not None for i in self._byte_ids[0x80:])

    def extend(self, data: bytes, own_id: int | None = None) -> list[int]:
        """The ids to feed for the appended bytes ``data`` (possibly none yet). ``own_id``: ``data`` is
        exactly this model's token ``own_id`` (fed as it is when nothing is pending)."""
        if own_id is not None and not self.pending and self.token_bytes[own_id] == data:
            self.fed_ids.append(own_id)
            return [own_id]
        buf = self.pending + data if self.pending else data
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError:
            return self._feed_mixed(buf, final=False)
        cut = self._boundary(text)
        if cut < len(text):
            self.pending = text[cut:].encode("utf-8")
            text = text[:cut]
        else:
            self.pending = b""
        ids = self._encode(text) if text else []
        self.fed_ids.extend(ids)
        return ids

    def flush(self) -> list[int]:
        """Feed whatever is pending (at the end of the text): an unfinished word as it is, bytes of
        an incomplete character as byte tokens."""
        buf, self.pending = self.pending, b""
        if not buf:
            return []
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError:
            return self._feed_mixed(buf, final=True)
        ids = self._encode(text)
        self.fed_ids.extend(ids)
        return ids

    def _feed_mixed(self, buf: bytes, final: bool) -> list[int]:
        """``buf`` holds invalid UTF-8, or an incomplete character at its end."""
        if not self._has_bytes:  # no byte tokens to spell invalid bytes with: U+FFFD text
            tail = b""
            if not final:
                try:
                    buf.decode("utf-8")
                except UnicodeDecodeError as e:
                    if e.reason == "unexpected end of data" and e.end == len(buf):
                        buf, tail = buf[:e.start], buf[e.start:]
            text = buf.decode("utf-8", errors="replace")
            cut = len(text) if final else self._boundary(text)
            self.pending = text[cut:].encode("utf-8") + tail
            ids = self._encode(text[:cut]) if cut else []
            self.fed_ids.extend(ids)
            return ids
        ids: list[int] = []
        pos, n = 0, len(buf)
        self.pending = b""
        while pos < n:
            try:
                text = buf[pos:].decode("utf-8")
                bad = None
            except UnicodeDecodeError as e:
                text = buf[pos:pos + e.start].decode("utf-8")
                if e.reason == "unexpected end of data" and not final:
                    bad = None
                    self.pending = buf[pos + e.start:]  # an incomplete character: wait for the rest
                    end = n
                else:
                    bad = buf[pos + e.start:pos + e.end]
                    end = pos + e.end
            else:
                end = n
            if text:
                if end == n and bad is None and not final:
                    cut = self._boundary(text)
                    if cut < len(text):
                        self.pending = text[cut:].encode("utf-8") + self.pending
                        text = text[:cut]
                if text:
                    ids.extend(self._encode(text))
            if bad is not None:
                spelled = [self._byte_ids[b] for b in bad]
                ids.extend(spelled if None not in spelled else self._encode("\ufffd"))
            pos = end
        self.fed_ids.extend(ids)
        return ids
