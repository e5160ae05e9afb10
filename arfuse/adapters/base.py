"""The narrow interface every causal language model adapter implements.

An adapter only loads a model and scores: it turns text into token ids (with the
character offsets each token closes) and token ids into float32 log-probabilities.
Fusion, metrics and data sets live elsewhere.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

BOS_POLICIES = ("auto", "always", "never")


@dataclass
class Encoding:
    """Token ids of a text and, for each token, the character offset where it ends.

    ``ends[i]`` is the index one past the last character that token ``i`` completes, so
    token ``i`` closes ``text[ends[i-1]:ends[i]]`` (empty when a token is only part of a
    character). ``ends`` is non-decreasing and ``ends[-1] == len(text)``.
    """

    ids: list[int]
    ends: list[int]


@dataclass
class ModelInfo:
    """What identifies a model's scores: everything that changes them goes in ``identity``."""

    name: str                      # what reports print
    kind: str                      # "hf", "gguf", "llama2c", "arfuse", ...
    num_parameters: int
    vocab_size: int
    max_length: int | None         # context length, None when unbounded (RNNs)
    identity: dict = field(default_factory=dict)  # path/hub id, revision, file hashes


class CausalLM(ABC):
    """A causal LM that scores token ids. Subclasses set ``info`` and ``bos_id``."""

    info: ModelInfo
    bos_id: int | None = None
    eos_id: int | None = None
    default_add_bos: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    # ---- tokenizer -------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> Encoding:
        """Token ids of ``text`` without any special tokens, with character end offsets."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""

    def token_bound(self, text: str) -> int | None:
        """An upper bound on ``len(encode(text).ids)`` without tokenizing, or None when unknown.

        Byte-level BPE, SentencePiece with byte fallback and word-level tokenizers give at most one
        token per UTF-8 byte of the text as their normaliser leaves it (NFKC can lengthen text, so
        the normalised text is measured), plus a prefix token or two (8 to spare)."""
        backend = getattr(getattr(self, "tokenizer", None), "backend_tokenizer", None)
        if backend is None:
            return None
        norm = backend.normalizer
        return len((norm.normalize_str(text) if norm is not None else text).encode()) + 8

    @abstractmethod
    def tokenizer_fingerprint(self) -> str:
        """A hash of the vocabulary and merges: equal hashes mean identical tokenization."""

    # ---- scoring ---------------------------------------------------------------------
    @abstractmethod
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw next-token logits, (B, T) -> (B, T, V), any float dtype."""

    def forward_logits_tail(self, input_ids: torch.Tensor, n: int) -> torch.Tensor:
        """Logits of the last ``n`` positions only, (B, T) -> (B, n, V): saves memory when scoring."""
        return self.forward_logits(input_ids)[:, -n:]

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 log-softmax over the vocabulary at every position: (B, T) -> (B, T, V)."""
        logits = self.forward_logits(input_ids.to(self.device), attention_mask if attention_mask is None else attention_mask.to(self.device))
        return torch.log_softmax(logits.float(), dim=-1)

    # ---- BOS policy ------------------------------------------------------------------
    def uses_bos(self, policy: str) -> bool:
        """Whether to prepend BOS under ``policy`` ('auto' follows the tokenizer's default)."""
        from arfuse.errors import ArfuseError

        if policy not in BOS_POLICIES:
            raise ArfuseError(f"unknown BOS policy {policy!r}: use one of {', '.join(BOS_POLICIES)}")
        if policy == "never":
            return False
        if policy == "always":
            if self.bos_id is None:
                raise ArfuseError(f"{self.info.name} has no BOS token: use --bos never (or auto)")
            return True
        return self.default_add_bos and self.bos_id is not None

    @property
    def num_parameters(self) -> int:
        return self.info.num_parameters


def fingerprint_json(obj) -> str:
    """A short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def backend_fingerprint(backend) -> str:
    """Hash of a ``tokenizers.Tokenizer``: vocabulary, merges, normalisation, pre-tokenisation, added
    tokens. Padding and truncation are left out: a caller that batches with the tokenizer (as
    transformers does for ``padding=True``) switches them on without changing any token."""
    s = backend.to_str()
    if backend.padding is not None or backend.truncation is not None:
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(s)
        plain.no_padding()
        plain.no_truncation()
        s = plain.to_str()
    return fingerprint_json(s)


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so big weights hash once."""
    import os

    from arfuse.paths import cache_root

    st = os.stat(path)
    memo_dir = cache_root() / "filehash"
    memo_dir.mkdir(parents=True, exist_ok=True)
    memo = memo_dir / (fingerprint_json([os.path.abspath(path), st.st_size, st.st_mtime_ns]) + ".txt")
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(digest)
    tmp.replace(memo)
    return digest
