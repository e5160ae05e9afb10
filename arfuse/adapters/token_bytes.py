"""The bytes each token of a vocabulary stands for in running text, and the helpers that feed a
model a piece of running text (fusion across models with different tokenizers).

Three tokenizer kinds are told apart by the tokenizer itself, never by a model's name:

* byte-level BPE (GPT-2, GPT-NeoX, SmolLM2): token strings spell bytes through GPT-2's
  byte-to-unicode table (``Ġ`` = space, ``Ċ`` = newline); a ``ByteLevel`` pre-tokenizer or decoder;
* SentencePiece-style (Llama, llama2.c): ``▁`` stands for a space and ``<0xNN>`` byte-fallback
  pieces for the byte 0xNN; a ``Metaspace`` pre-tokenizer or decoder, or a ``▁`` Replace;
* word-level (arfuse's own ``WordLevel`` tokenizers): a word token stands for what the decoder
  writes for it after another word (a space and the word); a special token that the tokenizer
  reads a line end as (arfuse's ``<eos>``) stands for ``"\\n"``.

Special tokens (BOS, EOS, padding, ``<unk>``, added special tokens) stand for no text: None.
"""
from __future__ import annotations

import json
import re

from arfuse.errors import ArfuseError

SPIECE_SPACE = "\u2581"  # ▁
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
KINDS = ("byte_level", "sentencepiece", "word")
# normalisers dropped when a piece of running text is tokenised: they change the text's bytes
# (unicode normal forms, lowercasing, stripping) or add a dummy prefix (Prepend)
_TEXT_CHANGING = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Prepend"}
_WORD_TAIL = re.compile(r"[^\S\n]*\S*\Z")


# ---- byte-level BPE ----------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE token strings)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_B2U = bytes_to_unicode()
_U2B_TABLE = str.maketrans({u: chr(b) for b, u in _B2U.items()})  # then .encode("latin-1") gives the bytes
_BYTE_LEVEL_STR = re.compile("[" + re.escape("".join(_B2U.values())) + "]*")


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token string spells (``"Ġthe"`` -> ``b" the"``), None when it holds
    a character outside the byte table (not a byte-level token)."""
    if not _BYTE_LEVEL_STR.fullmatch(token):
        return None
    return token.translate(_U2B_TABLE).encode("latin-1")


# ---- SentencePiece -----------------------------------------------------------------------
def sentencepiece_bytes(token: str, replacement: str = SPIECE_SPACE, byte_fallback: bool = True) -> bytes:
    """The bytes a SentencePiece piece stands for: ``"▁the"`` -> ``b" the"``, ``"<0x0A>"`` -> ``b"\\n"``
    (when the model has byte fallback)."""
    if byte_fallback and len(token) == 6:
        m = BYTE_PIECE.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)])
    return token.replace(replacement, " ").encode("utf-8")


def piece_bytes_llama2c(pieces: list[bytes], special: set[int]) -> list[bytes | None]:
    """llama2.c tokenizer .bin pieces (spaces already real spaces, ``<0xNN>`` byte fallback)."""
    out: list[bytes | None] = []
    for i, p in enumerate(pieces):
        if i in special:
            out.append(None)
            continue
        m = BYTE_PIECE.fullmatch(p.decode("latin-1")) if len(p) == 6 else None
        out.append(bytes([int(m.group(1), 16)]) if m else p)
    return out


# ---- word level --------------------------------------------------------------------------
def word_boundary(text: str) -> int:
    """How much of pending running text a word-level tokenizer may be fed now: everything before
    the unfinished last word and the spaces before it (line ends are tokens of their own and go)."""
    return _WORD_TAIL.search(text).start()


# ---- Hugging Face (tokenizers) -----------------------------------------------------------
def _walk(node):
    """Every component dict of a tokenizer.json part (Sequences unrolled)."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "decoders", "processors"):
            for sub in node.get(key) or ():
                yield from _walk(sub)


def _types(node) -> set[str]:
    return {c.get("type") for c in _walk(node)}


def _replaces_metaspace(node) -> bool:
    for c in _walk(node):
        if c.get("type") == "Replace":
            pat, content = c.get("pattern") or {}, c.get("content", "")
            if SPIECE_SPACE in (pat.get("String") or pat.get("Regex") or "") or SPIECE_SPACE in content:
                return True
    return False


def hf_kind(spec: dict) -> str | None:
    """The kind of a tokenizer from its tokenizer.json (a dict): one of ``KINDS``, or None."""
    model = spec.get("model") or {}
    if model.get("type") == "WordLevel":
        return "word"
    pre, dec, norm = spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")
    if "ByteLevel" in _types(pre) | _types(dec):
        return "byte_level"
    if "Metaspace" in _types(pre) | _types(dec) or _replaces_metaspace(dec) or _replaces_metaspace(norm):
        return "sentencepiece"
    return None


def _metaspace_replacement(spec: dict) -> str:
    for part in ("pre_tokenizer", "decoder"):
        for c in _walk(spec.get(part)):
            if c.get("type") == "Metaspace" and c.get("replacement"):
                return c["replacement"]
    return SPIECE_SPACE


def no_tokenizer_bytes_error(name: str, what: str) -> ArfuseError:
    return ArfuseError(
        f"{name}: {what}, so arfuse cannot tell which text its tokens stand for; fusing models with different "
        "tokenizers needs it: fuse this model only with models of the same tokenizer, or give its adapter "
        "tokenizer_token_bytes() and encode_piece() (arfuse.adapters.base.CausalLM)")


class HFTokenBytes:
    """What a fast Hugging Face tokenizer's tokens stand for, and a copy of it that tokenises pieces
    of running text (no prefix space, no text-changing normaliser, special tokens' text read as text)."""

    def __init__(self, hf_tokenizer, name: str):
        from tokenizers import Tokenizer

        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise no_tokenizer_bytes_error(name, f"its tokenizer ({type(hf_tokenizer).__name__}) is not a fast "
                                                 "(Rust) Hugging Face tokenizer")
        spec = json.loads(backend.to_str())
        self.kind = hf_kind(spec)
        if self.kind is None:
            model_type = (spec.get("model") or {}).get("type")
            raise no_tokenizer_bytes_error(name, f"its tokenizer ({model_type} model) is neither byte-level BPE, "
                                                 "SentencePiece-style nor word-level")
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        special = {i for i, t in added.items() if t.special}
        special.update(int(i) for i in getattr(hf_tokenizer, "all_special_ids", ()) if i is not None)
        n = backend.get_vocab_size(with_added_tokens=True)
        vocab = backend.get_vocab(with_added_tokens=True)
        strings: list[str | None] = [None] * max(n, max(vocab.values(), default=-1) + 1)
        for s, i in vocab.items():
            strings[i] = s
        out: list[bytes | None] = [None] * len(strings)
        if self.kind == "byte_level":
            for i, s in enumerate(strings):
                if s is not None:
                    out[i] = byte_level_bytes(s)
        elif self.kind == "sentencepiece":
            rep = _metaspace_replacement(spec)
            fallback = bool((spec.get("model") or {}).get("byte_fallback"))
            for i, s in enumerate(strings):
                if s is not None:
                    out[i] = sentencepiece_bytes(s, rep, fallback)
        else:  # word level: what the decoder writes for the token after another word
            dec = backend.decoder
            anchor = "x"
            base = dec.decode([anchor]) if dec is not None else anchor
            for i, s in enumerate(strings):
                if s is None:
                    continue
                full = dec.decode([anchor, s]) if dec is not None else anchor + " " + s
                out[i] = full[len(base):].encode() if full.startswith(base) else None
        for i, tok in added.items():  # added tokens are matched in the raw text: they stand for their content
            if i < len(out) and not tok.special and self.kind != "word":
                out[i] = tok.content.encode()
        for i in special:
            if 0 <= i < len(out):
                out[i] = None
        if self.kind == "word":
            # a special token the tokenizer reads a line end as (arfuse's <eos>) stands for the line end
            for ch in ("\n",):
                ids = backend.encode(ch, add_special_tokens=False).ids
                if len(ids) == 1 and ids[0] in special:
                    out[ids[0]] = ch.encode()
        if not any(b for b in out):
            raise no_tokenizer_bytes_error(name, "no token of its tokenizer has a string form")
        self.token_bytes = out

        # the copy that tokenises pieces of running text
        if self.kind == "word":
            self.piece_tokenizer = backend  # its normaliser reads line ends as <eos>: keep it
        else:
            spec["post_processor"] = None
            spec["truncation"] = None
            spec["padding"] = None
            spec["normalizer"] = _drop_text_changing(spec.get("normalizer"))
            for c in _walk(spec.get("pre_tokenizer")):
                if c.get("type") == "ByteLevel":
                    c["add_prefix_space"] = False
                elif c.get("type") == "Metaspace":
                    c["prepend_scheme"] = "never"
                    if "add_prefix_space" in c:
                        c["add_prefix_space"] = False
            self.piece_tokenizer = Tokenizer.from_str(json.dumps(spec))
            self.piece_tokenizer.encode_special_tokens = True  # "<|endoftext|>" in running text is text
        self._memo: dict[str, tuple[int, ...]] = {}

    def encode_piece(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(self.piece_tokenizer.encode(text, add_special_tokens=False).ids) if text else ()
            if len(text) <= 64:
                if len(self._memo) >= 100_000:
                    self._memo.clear()
                self._memo[text] = ids
        return list(ids)


def _drop_text_changing(norm: dict | None) -> dict | None:
    """The normaliser without its text-changing or prefix-adding parts (Sequences flattened one level)."""
    if norm is None:
        return None
    if norm.get("type") == "Sequence":
        kept = [n for n in (_drop_text_changing(c) for c in norm.get("normalizers") or ()) if n is not None]
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else {"type": "Sequence", "normalizers": kept}
    return None if norm.get("type") in _TEXT_CHANGING else norm


# ---- shared ------------------------------------------------------------------------------
def fit_to_vocab(token_bytes: list[bytes | None], vocab_size: int) -> list[bytes | None]:
    """``token_bytes`` cut or padded with None to the model's ``vocab_size`` rows (padded embeddings)."""
    if len(token_bytes) >= vocab_size:
        return list(token_bytes[:vocab_size])
    return list(token_bytes) + [None] * (vocab_size - len(token_bytes))


def byte_token_ids(token_bytes: list[bytes | None]) -> list[int | None]:
    """For each byte value, the id of a token standing for that single byte (the first such id), or None."""
    out: list[int | None] = [None] * 256
    for i, b in enumerate(token_bytes):
        if b is not None and len(b) == 1 and out[b[0]] is None:
            out[b[0]] = i
    return out


def duplicate_byte_strings(token_bytes: list[bytes | None]) -> dict[bytes, list[int]]:
    """Byte strings that several ids stand for (e.g. SentencePiece's ``<0x61>`` and ``a``)."""
    seen: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes):
        if b is not None:
            seen.setdefault(b, []).append(i)
    return {b: ids for b, ids in seen.items() if len(ids) > 1}
