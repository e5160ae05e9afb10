"""The narrow interface every causal language model adapter implements.

An adapter loads a model and scores: it turns text into token ids (with the character offsets
each token closes) and token ids into float32 log-probabilities. For generation it offers an
incremental step (``forward_step``) whose ``StepState`` rolls back and selects its own rows, its
input embeddings and output layer as methods, and its few-row CPU kernels. Fusion, metrics and
data sets live elsewhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from arfuse.adapters.kernels import FewRowKernels
from arfuse.errors import ArfuseError

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


class StepState(ABC):
    """A model's incremental state after the tokens fed so far (a KV cache, an RNN's hidden states,
    or the token sequences themselves), one per batch row. ``CausalLM.forward_step`` makes and
    extends it; whoever decodes only calls these two methods."""

    @abstractmethod
    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        """Of the last ``n_fed`` positions fed (since the last rollback), row b keeps the first
        ``keep[b]`` ((B,) long); the rest are forgotten, as if never fed."""

    @abstractmethod
    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (1-D long), in that order."""

    def concat(self, other: StepState | None, n_other: int) -> None:
        """Append ``n_other`` rows after this state's rows, in place: ``other``'s rows (a state of the
        same model), or rows that have seen nothing yet when ``other`` is None. Continuous batching
        joins newly prefilled requests into a running batch this way; no row's results change."""
        raise ArfuseError(f"{type(self).__name__} cannot join two batches: serve this model with --max-batch 1, "
                          "or use a backend whose state can (transformers models)")


class MaskedKVState(StepState):
    """A KV cache with ``mask`` (B, T_past) bool, True for real tokens, and ``next_pos`` (B,) long,
    each row's next position (it counts real tokens only). Rolled-back positions become masked-out
    ones, cropped once no row uses them; subclasses crop and select their own tensors."""

    mask: torch.Tensor
    next_pos: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        L = self.mask.shape[1]
        keep = keep.to(self.mask.device)
        tail = self.mask[:, L - n_fed:]  # (B, n_fed)
        kept = tail & (torch.arange(n_fed, device=tail.device)[None, :] < keep[:, None])
        self.mask = torch.cat([self.mask[:, :L - n_fed], kept], dim=1)
        self.next_pos = self.next_pos - (tail & ~kept).long().sum(1).to(self.next_pos.device)
        used = self.mask.any(0)  # crop the trailing positions that no row uses any more
        trailing = int(L - (torch.nonzero(used).max().item() + 1)) if used.any() else L
        if trailing:
            self.mask = self.mask[:, :L - trailing]
            self._crop(trailing)

    def select(self, rows: torch.Tensor) -> None:
        self.mask = self.mask[rows.to(self.mask.device)]
        self.next_pos = self.next_pos[rows.to(self.next_pos.device)]
        self._select(rows)
        self._trim_left()

    def concat(self, other: MaskedKVState | None, n_other: int) -> None:
        """The shorter of the two caches is padded on the left (masked-out positions); rows keep
        their own positions (``next_pos``)."""
        if other is not None and type(other) is not type(self):
            raise ArfuseError(f"cannot join a {type(other).__name__} to a {type(self).__name__}: states of one model only")
        mask_b = other.mask if other is not None else torch.zeros(n_other, 0, dtype=torch.bool)
        pos_b = other.next_pos if other is not None else torch.zeros(n_other, dtype=torch.long)
        L = max(self.length, mask_b.shape[1])
        pad_a, pad_b = L - self.length, L - mask_b.shape[1]

        def left(m: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([m.new_zeros(m.shape[0], n), m], dim=1)  # (B, L)

        self._concat(other, n_other, pad_a, pad_b)
        self.mask = torch.cat([left(self.mask, pad_a), left(mask_b.to(self.mask.device), pad_b)], dim=0)
        self.next_pos = torch.cat([self.next_pos, pos_b.to(self.next_pos.device)])
        self._trim_left()

    def _trim_left(self) -> None:
        """Drop leading positions that no row uses (after rows leave or join), where the cache can:
        a long-running batch stays as wide as its longest row, not as its whole history."""
        used = self.mask.any(0)
        n = int(torch.nonzero(used).min().item()) if used.any() else 0
        if n and self._crop_left(n):
            self.mask = self.mask[:, n:]

    def _crop_left(self, n: int) -> bool:
        """Drop the cache's first ``n`` positions if this cache can (True), else leave it (False)."""
        return False

    def _concat(self, other: MaskedKVState | None, n_other: int, pad_self: int, pad_other: int) -> None:
        """Append ``other``'s cache rows (``n_other`` empty rows when None) after this cache's, each
        first padded on the left by ``pad_self`` / ``pad_other`` positions (``mask`` is still the old one)."""
        super().concat(other, n_other)

    @abstractmethod
    def _crop(self, n: int) -> None:
        """Drop the cache's last ``n`` positions (``mask`` is cropped already)."""

    @abstractmethod
    def _select(self, rows: torch.Tensor) -> None:
        """Keep the cache's batch rows ``rows`` (``mask`` and ``next_pos`` are selected already)."""


@dataclass
class RerunState(StepState):
    """No cache: each row's real tokens so far, which every step runs the model over again."""

    seqs: list[list[int]]

    def rollback(self, n_fed: int, keep: torch.Tensor) -> None:
        for seq, k in zip(self.seqs, keep.tolist()):
            if n_fed - k:
                del seq[len(seq) - (n_fed - k):]

    def select(self, rows: torch.Tensor) -> None:
        self.seqs = [self.seqs[i] for i in rows.tolist()]

    def concat(self, other: RerunState | None, n_other: int) -> None:
        self.seqs = self.seqs + ([list(s) for s in other.seqs] if other is not None else [[] for _ in range(n_other)])


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

    # ---- running text (fusion across tokenizers) ---------------------------------------
    def token_bytes(self) -> list[bytes | None]:
        """The UTF-8 bytes each token id stands for in running text, ``info.vocab_size`` entries:
        ``b" the"`` for byte-level ``Ġthe`` or SentencePiece ``▁the``, one byte for a byte token
        (``<0x0A>`` -> ``b"\\n"``; a byte-level token may hold part of a character), None for special
        tokens (BOS, EOS, padding, ``<unk>``, added special tokens) and for ids past the tokenizer
        (padded embedding rows). Computed once per model (``tokenizer_token_bytes``); do not mutate it."""
        tb = self.__dict__.get("_token_bytes")
        if tb is None:
            from arfuse.adapters.token_bytes import fit_to_vocab

            tb = self.__dict__["_token_bytes"] = fit_to_vocab(self.tokenizer_token_bytes(), self.info.vocab_size)
        return tb

    def tokenizer_token_bytes(self) -> list[bytes | None]:
        """``token_bytes`` of the tokenizer's own ids (any length: ``token_bytes`` fits it to the
        vocabulary). Adapters whose tokens have a string form override this and ``encode_piece``."""
        from arfuse.adapters.token_bytes import no_tokenizer_bytes_error

        raise no_tokenizer_bytes_error(f"{self.info.name} ({self.info.kind})", "its adapter gives no string form of "
                                       "its tokens")

    def encode_piece(self, text: str) -> list[int]:
        """Token ids of ``text`` as a continuation of running text: no BOS or special tokens, no
        dummy-prefix space, so that ``b"".join(token_bytes()[i] for i in ids) == text.encode()``
        (exactly for byte-level BPE and SentencePiece with byte fallback; word-level tokenizers
        lose the exact spacing and read unknown words as ``<unk>``)."""
        from arfuse.adapters.token_bytes import no_tokenizer_bytes_error

        raise no_tokenizer_bytes_error(f"{self.info.name} ({self.info.kind})", "its adapter cannot tokenise a piece "
                                       "of running text")

    def piece_boundary(self, text: str) -> int:
        """How many characters of pending running text ``text`` may be fed now (``encode_piece``); the
        rest waits for more text. All of it, except for word-level tokenizers, which take whole words
        only: they stop before the whitespace that precedes an unfinished last word."""
        return len(text)

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

    # ---- generation ------------------------------------------------------------------
    @torch.no_grad()
    def forward_step(self, input_ids: torch.Tensor, past: StepState | None = None,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
        """Logits (B, T, V) of the new tokens ``input_ids`` (B, T) given the state after the earlier
        ones, and the state after them (``past`` may be extended in place: use the one returned).
        ``attention_mask`` (B, T) marks the real new tokens: padding changes nothing.

        This default keeps no cache and reruns each row on its whole sequence (correct, slow);
        backends with a KV cache or a recurrent state override it."""
        B, T = input_ids.shape
        real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        state = past if past is not None else RerunState([[] for _ in range(B)])
        out = torch.zeros(B, T, self.info.vocab_size, device=self.device)
        for b, seq in enumerate(state.seqs):
            new = [int(t) for t, r in zip(input_ids[b].tolist(), real[b].tolist()) if r]
            seq.extend(new)
            if new:  # a row of padding only: its state is unchanged
                x = torch.tensor([seq], dtype=torch.long, device=self.device)
                out[b, real[b].to(self.device)] = self.forward_logits_tail(x, len(new))[0].float()  # (n, V)
        return out, state

    def network(self) -> torch.nn.Module | None:
        """The torch module that computes the logits (its layers get the few-row kernels), or None."""
        return None

    def input_embeddings(self) -> torch.Tensor:
        """The (V, D) token-embedding matrix (the cosine rule's similarities)."""
        raise ArfuseError(f"{self.info.name} ({self.info.kind}) offers no token embeddings: a fusion rule that "
                          "reads them (the cosine rule) cannot fuse it; choose another --rule")

    def output_layer(self) -> torch.nn.Linear | None:
        """The ``nn.Linear`` that maps the last hidden states to the logits, or None when there is none."""
        return None

    @contextlib.contextmanager
    def output_replaced(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """While inside, the output layer returns ``fn(x)`` for its input x (the last hidden states,
        (..., D)), so the model's logits are whatever ``fn`` makes of them. Needs ``output_layer()``."""
        lin = self.output_layer()
        if lin is None:
            raise ArfuseError(f"{self.info.name} has no output layer to replace")
        d = lin.__dict__
        before = d.get("forward")
        d["forward"] = fn
        try:
            yield
        finally:
            if before is None:
                d.pop("forward", None)
            else:
                d["forward"] = before

    def fast_kernels(self) -> FewRowKernels:
        """This model's few-row CPU kernels (``arfuse.adapters.kernels``): made and measured on the
        first call, brought up to date with the weights on each; enter ``.active()`` to use them."""
        kernels = self.__dict__.get("_fast_kernels")
        if kernels is None:
            kernels = self.__dict__["_fast_kernels"] = FewRowKernels(self.network())
        else:
            kernels.refresh()
        return kernels

    # ---- BOS policy ------------------------------------------------------------------
    def uses_bos(self, policy: str) -> bool:
        """Whether to prepend BOS under ``policy`` ('auto' follows the tokenizer's default)."""
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
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArfuseError(f"the arfuse cache folder {cache_root()} cannot be used ({e.strerror or e}): set "
                          "ARFUSE_CACHE=<a writable folder>") from None
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
