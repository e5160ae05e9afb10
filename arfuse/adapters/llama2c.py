"""llama2.c checkpoints (Karpathy's legacy "version 0" .bin export); their tokenizer .bin is read
by ``arfuse.adapters.llama2c_tokenizer``.

Checkpoint layout (little-endian): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len), then float32 weights in this order: token_embedding
(V, D), rms_att (L, D), wq (L, D, D), wk (L, KV, D), wv (L, KV, D), wo (L, D, D),
rms_ffn (L, D), w1 (L, H, D), w2 (L, D, H), w3 (L, H, D), rms_final (D,), then two unused
RoPE tables freq_cis_real and freq_cis_imag (seq_len * head_size / 2 floats each), then the
classifier wcls (V, D) only when the header's vocab_size is negative (unshared weights).
Matrices are (out, in), as PyTorch's Linear stores them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arfuse.adapters.base import CausalLM, Encoding, MaskedKVState, ModelInfo, file_sha256
from arfuse.adapters.llama2c_tokenizer import BOS_ID, EOS_ID, Llama2cTokenizer, find_tokenizer
from arfuse.errors import ArfuseError

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer (version >= 1) export format
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


# ---- model -----------------------------------------------------------------------------
@dataclass
class KVCache(MaskedKVState):
    """Keys (after RoPE) and values of every layer so far, which of them are padding, and each row's
    next position. A step returns a new cache and leaves the old one as it was; rollback and select
    edit this one."""

    keys: list[torch.Tensor]    # per layer (B, n_kv_heads, T_past, head_size)
    values: list[torch.Tensor]  # per layer (B, n_kv_heads, T_past, head_size)
    mask: torch.Tensor          # (B, T_past) bool, True for real tokens
    next_pos: torch.Tensor      # (B,) long

    def _crop(self, n: int) -> None:
        self.keys = [k[:, :, :-n] for k in self.keys]
        self.values = [v[:, :, :-n] for v in self.values]

    def _select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.keys[0].device)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


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

    def tokenizer_token_bytes(self) -> list[bytes | None]:
        """Pieces as they are (llama2.c's export writes ``▁`` as a space), ``<0xNN>`` as the byte; the
        pieces that decode to nothing (BOS, EOS) and ``<unk>`` stand for no text."""
        from arfuse.adapters.token_bytes import piece_bytes_llama2c

        tok = self.tokenizer
        special = {i for i, raw in enumerate(tok.raw) if raw == b""} | {i for i, p in enumerate(tok.pieces)
                                                                        if p == b"<unk>"}
        return piece_bytes_llama2c(tok.pieces, special)

    def encode_piece(self, text: str) -> list[int]:
        """llama2.c's BPE of ``text`` without the dummy-prefix space. The tokenizer's chunks are only an
        optimisation (encoding a text as one chunk gives the same tokens), so a short piece is one
        memoised chunk."""
        if not text:
            return []
        tok = self.tokenizer
        if len(text) <= 64:
            return list(tok._encode_chunk(text)[0])
        starts = tok._chunk_starts(text)
        ids: list[int] = []
        for a, b in zip(starts, starts[1:] + [len(text)]):
            ids.extend(tok._encode_chunk(text[a:b])[0])
        return ids

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids.to(self.device), attention_mask)[0]

    @torch.no_grad()
    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model(input_ids.to(self.device), n_tail=n)[0]

    def network(self) -> nn.Module:
        return self.model

    def input_embeddings(self) -> torch.Tensor:
        return self.model.tok_embeddings.weight.detach()

    def output_layer(self) -> nn.Linear:
        return self.model.output

    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: KVCache | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) of new tokens given the cache of the earlier ones, and the new cache.

        ``attention_mask`` covers the new tokens only (left-padded prompts on the first step).
        """
        return self.model(input_ids.to(self.device), attention_mask, past=past)
