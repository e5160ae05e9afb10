"""llama2.c checkpoints (Karpathy's legacy "version 0" .bin export) and their tokenizer .bin.

Checkpoint layout (little-endian): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len), then float32 weights in this order: token_embedding
(V, D), rms_att (L, D), wq (L, D, D), wk (L, KV, D), wv (L, KV, D), wo (L, D, D),
rms_ffn (L, D), w1 (L, H, D), w2 (L, D, H), w3 (L, H, D), rms_final (D,), then two unused
RoPE tables freq_cis_real and freq_cis_imag (seq_len * head_size / 2 floats each), then the
classifier wcls (V, D) only when the header's vocab_size is negative (unshared weights).
Matrices are (out, in), as PyTorch's Linear stores them.

Tokenizer layout: int32 max_token_length, then for each of the model's vocab_size tokens a
float32 merge score, an int32 byte length and the token's bytes. Ids 0, 1, 2 are <unk>,
<s>, </s>; ids 3..258 are the byte-fallback tokens <0x00>..<0xFF>.
"""
from __future__ import annotations

import heapq
import re
import struct
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arfuse.adapters.base import CausalLM, Encoding, ModelInfo, file_sha256
from arfuse.errors import ArfuseError

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer (version >= 1) export format
BOS_ID, EOS_ID = 1, 2
BYTE_FALLBACK_OFFSET = 3      # llama2.c: byte b is token b + 3 (after <unk>, <s>, </s>)
MIN_MERGE_SCORE = -1e10       # llama2.c's initial best score: a merge must score above it
ROPE_THETA = 10000.0
# float64 makes results independent of batch shape to ~1e-12 (float32 matmul kernels vary with it)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
RMS_EPS = 1e-5


# ---- checkpoint ------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama2cConfig:
    """The architecture stored in a llama2.c checkpoint header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def describe(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
                f"{'shared' if self.shared_classifier else 'unshared'} classifier")

    def weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every float32 block in file order; '_freq_cis' blocks are skipped on load."""
        d, h, n, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        shapes = [
            ("token_embedding", (v, d)), ("rms_att", (n, d)), ("wq", (n, d, d)), ("wk", (n, kv, d)),
            ("wv", (n, kv, d)), ("wo", (n, d, d)), ("rms_ffn", (n, d)), ("w1", (n, h, d)), ("w2", (n, d, h)),
            ("w3", (n, h, d)), ("rms_final", (d,)),
            ("_freq_cis_real", (self.seq_len * self.head_size // 2,)),
            ("_freq_cis_imag", (self.seq_len * self.head_size // 2,)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (v, d)))
        return shapes

    def file_size(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.weight_shapes())


def read_header(path: Path) -> Llama2cConfig:
    """The config of a legacy llama2.c checkpoint, with clear errors for other files."""
    if not path.is_file():
        raise ArfuseError(f"llama2.c checkpoint {path} does not exist: check the path")
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ArfuseError(f"{path} is {len(head)} bytes, shorter than the {HEADER.size}-byte llama2.c header: "
                          "not a llama2.c checkpoint")
    if struct.unpack_from("<I", head)[0] == VERSIONED_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        raise ArfuseError(f"{path} is a llama2.c export of version {version} (magic 'ak42'); arfuse reads the legacy "
                          "version 0 format: re-export with llama2.c's `python export.py out.bin --version 0 ...`")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack(head)
    cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0 or dim % heads or heads % kv_heads \
            or cfg.head_size % 2:
        raise ArfuseError(f"{path} has an impossible llama2.c header ({cfg.describe()}): "
                          "not a legacy llama2.c checkpoint")
    return cfg


def read_checkpoint(path: Path) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights (freq_cis tables dropped) of a legacy llama2.c checkpoint."""
    cfg = read_header(path)
    expected, actual = cfg.file_size(), path.stat().st_size
    if actual != expected:
        what = "too short (truncated?)" if actual < expected else "too long"
        raise ArfuseError(f"{path} is {what} for its header ({cfg.describe()}): expected {expected:,} bytes, "
                          f"found {actual:,}: re-download or re-export it with llama2.c's legacy (version 0) export")
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER.size).astype(np.float32))
    weights, off = {}, 0
    for name, shape in cfg.weight_shapes():
        n = int(np.prod(shape))
        if not name.startswith("_"):
            weights[name] = flat[off:off + n].view(shape)
        off += n
    return cfg, weights


# ---- tokenizer -------------------------------------------------------------------------
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


# ---- model -----------------------------------------------------------------------------
@dataclass
class KVCache:
    """Keys (after RoPE) and values of every layer so far, which of them are padding, and
    each row's next position. Steps return a new cache; the old one is left as it was."""

    keys: list[torch.Tensor]    # per layer (B, n_kv_heads, T_past, head_size)
    values: list[torch.Tensor]  # per layer (B, n_kv_heads, T_past, head_size)
    mask: torch.Tensor          # (B, T_past) bool, True for real tokens
    next_pos: torch.Tensor      # (B,) long

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half-precision inputs normalise in float32
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head, as llama2.c does. x (B, T, h, hs); cos, sin (B, T, 1, hs/2)."""
    x0, x1 = x.to(torch.promote_types(x.dtype, cos.dtype)).unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, h, hs/2) each
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg: Llama2cConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_norm = RMSNorm(cfg.dim)
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attention_norm(x)
        q = apply_rope(self.wq(h).view(B, T, cfg.n_heads, cfg.head_size), cos, sin).transpose(1, 2)  # (B, H, T, hs)
        k = apply_rope(self.wk(h).view(B, T, cfg.n_kv_heads, cfg.head_size), cos, sin).transpose(1, 2)  # (B, KV, T, hs)
        v = self.wv(h).view(B, T, cfg.n_kv_heads, cfg.head_size).transpose(1, 2)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, KV, T_all, hs)
        rep = cfg.n_heads // cfg.n_kv_heads  # query head j reads key/value head j // rep
        att = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                             attn_mask=allowed)  # (B, H, T, hs)
        x = x + self.wo(att.transpose(1, 2).reshape(B, T, cfg.dim))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h)), k, v


class Llama2cTransformer(nn.Module):
    """llama2.c's Llama: RMSNorm, adjacent-pair RoPE, grouped-query attention, SwiGLU."""

    def __init__(self, cfg: Llama2cConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.shared_classifier:
            self.output.weight = self.tok_embeddings.weight

    def load_llama2c_weights(self, w: dict[str, torch.Tensor]) -> None:
        """Copy the weights returned by ``read_checkpoint`` into the modules."""
        with torch.no_grad():
            self.tok_embeddings.weight.copy_(w["token_embedding"])
            for i, layer in enumerate(self.layers):
                layer.attention_norm.weight.copy_(w["rms_att"][i])
                layer.ffn_norm.weight.copy_(w["rms_ffn"][i])
                for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                    getattr(layer, name).weight.copy_(w[name][i])
            self.norm.weight.copy_(w["rms_final"])
            if not self.cfg.shared_classifier:
                self.output.weight.copy_(w["wcls"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, n_tail: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) of the new tokens (the last ``n_tail`` only, if given) and the extended cache.

        ``attention_mask`` (B, T) marks the new tokens that are real (1) or padding (0); positions
        count real tokens only, so left padding changes nothing.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        new_mask = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None \
            else attention_mask.to(dev).bool()
        next_pos = past.next_pos if past is not None else torch.zeros(B, dtype=torch.long, device=dev)
        pos = (next_pos[:, None] + new_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        if T and int(pos.max()) >= self.cfg.seq_len:
            raise ArfuseError(f"position {int(pos.max())} is past this llama2.c model's context of {self.cfg.seq_len} "
                              f"tokens: score long texts in windows of at most {self.cfg.seq_len} tokens")
        # float32 angles as llama2.c computes them, whatever the weights' dtype
        hs = self.cfg.head_size
        inv_freq = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, hs, 2, device=dev).float() / hs)  # (hs/2,)
        ang = pos.float()[..., None] * inv_freq  # (B, T, hs/2)
        cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]  # (B, T, 1, hs/2)

        t_past = past.length if past is not None else 0
        key_mask = new_mask if past is None else torch.cat([past.mask, new_mask], dim=1)  # (B, T_all)
        q_idx = torch.arange(T, device=dev)[:, None] + t_past
        k_idx = torch.arange(t_past + T, device=dev)[None, :]
        # causal over real keys; a query may always see itself, so padding rows stay finite
        allowed = ((k_idx <= q_idx) & key_mask[:, None, :]) | (k_idx == q_idx)  # (B, T, T_all)

        x = self.tok_embeddings(input_ids)  # (B, T, D)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            pk, pv = (past.keys[i], past.values[i]) if past is not None else (None, None)
            x, k, v = layer(x, cos, sin, allowed[:, None], pk, pv)
            keys.append(k)
            values.append(v)
        if n_tail is not None:
            x = x[:, T - n_tail:]
        logits = self.output(self.norm(x))  # (B, T or n_tail, V)
        cache = KVCache(keys, values, key_mask, next_pos + new_mask.long().sum(1))
        return logits, cache


# ---- adapter ---------------------------------------------------------------------------
class Llama2cLM(CausalLM):
    """A llama2.c legacy checkpoint with its tokenizer .bin; always starts with BOS."""

    default_add_bos = True

    def __init__(self, checkpoint: str, tokenizer: str | None = None, device: str = "cpu", *, dtype: str = "float32"):
        from arfuse.adapters.hf import resolve_device

        if dtype not in DTYPES:
            raise ArfuseError(f"unknown dtype {dtype!r} for a llama2.c model: use one of {', '.join(DTYPES)}")

        path = Path(checkpoint).expanduser()
        cfg, weights = read_checkpoint(path)
        tok_path = find_tokenizer(path, cfg.vocab_size) if tokenizer is None else Path(tokenizer).expanduser()
        self.tokenizer = Llama2cTokenizer.from_file(tok_path, cfg.vocab_size)
        self.config = cfg
        self.device = resolve_device(str(device))
        self.dtype = DTYPES[dtype]
        self.bos_id, self.eos_id = BOS_ID, EOS_ID
        self.model = Llama2cTransformer(cfg)
        self.model.load_llama2c_weights(weights)
        self.model.to(self.device, self.dtype).eval()
        tok_sha = file_sha256(tok_path)
        self.info = ModelInfo(
            name=path.stem,
            kind="llama2c",
            num_parameters=sum(p.numel() for p in self.model.parameters()),  # freq_cis tables are not parameters
            vocab_size=cfg.vocab_size,
            max_length=cfg.seq_len,
            identity={"path": str(path.resolve()), "sha256": file_sha256(path), "tokenizer_sha256": tok_sha},
        )

    def encode(self, text: str) -> Encoding:
        return self.tokenizer.encode(text)

    def token_bound(self, text: str) -> int:
        """A dummy-prefix space, then at most one token per UTF-8 byte (byte fallback), 8 to spare."""
        return len(text.encode()) + 8

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def tokenizer_fingerprint(self) -> str:
        return self.info.identity["tokenizer_sha256"]

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids.to(self.device), attention_mask)[0]

    @torch.no_grad()
    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model(input_ids.to(self.device), n_tail=n)[0]

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: KVCache | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) of new tokens given the cache of the earlier ones, and the new cache.

        ``attention_mask`` covers the new tokens only (left-padded prompts on the first step).
        """
        return self.model(input_ids.to(self.device), attention_mask, past=past)
