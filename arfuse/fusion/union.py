"""The top-k union rule across vocabularies (UniTE, "Determine-Then-Ensemble", ICLR 2025).

Models that do not share a tokenizer still agree on text. At each step every model proposes its
k most likely tokens; the union of their strings (by bytes, so GPT-2's ``Ġthe`` and
SentencePiece's ``▁the`` are one candidate, `` the``) is the candidate set. A model's
probability of a candidate it did not propose comes from the vocabulary map: the token with
exactly that string, or, where the string is several of its tokens, its first sub-token. Each
model's probabilities are renormalised over the union and mixed with the AR weights,
P(s) = w q_LLM(s) + (1 - w) q_SLM(s). With one tokenizer and k covering the vocabulary this is
the linear rule.

``Vocab`` holds one model's side of the map: its tokens' byte strings indexed once per tokenizer
fingerprint (cached), and the memoised route of any string to its first sub-token. The map of a
pair is two lookups, one into each model's index; nothing is hard-coded per model.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Param, Rule

EOS = "<eos>"   # the key every model's end-of-sequence token shares (token strings are bytes, so it cannot clash)
Key = "bytes | str"


class Vocab:
    """One model's tokens by byte string: ``key[i]`` for token i (None for a token with no string
    form), ``ids(key)`` the tokens that are exactly that string, ``route(key)`` the token to read a
    string's probability from (itself or its first sub-token), memoised."""

    def __init__(self, name: str, token_bytes: Sequence[bytes | None], first_token: Callable[[str], list[int]],
                 eos_id: int | None = None):
        self.name = name
        self.key: list = list(token_bytes)
        if eos_id is not None and 0 <= eos_id < len(self.key):
            self.key[eos_id] = EOS
        self.size = len(self.key)
        self._index: dict = {}
        for i, b in enumerate(self.key):
            if b is not None and b != b"":
                self._index.setdefault(b, []).append(i)
        if not self._index:
            raise ArfuseError(f"{name}: none of its {self.size:,} tokens has a string form, so the union rule cannot "
                              "align it with another vocabulary: fuse it with a model of the same tokenizer "
                              "(--rule linear) or give a model whose tokenizer decodes to text")
        self._encode = first_token
        self._route: dict = {}

    def ids(self, key) -> list[int]:
        """The tokens whose string is exactly ``key`` (several where a vocabulary repeats a string)."""
        return self._index.get(key, [])

    def route(self, key) -> list[int]:
        """The tokens whose probabilities stand for ``key``: the exact tokens, else the first token of
        the model's own tokenization of the string (empty when it has none)."""
        hit = self._index.get(key)
        if hit is not None:
            return hit
        got = self._route.get(key)
        if got is None:
            got = self._route[key] = self._first(key)
        return got

    def _first(self, key) -> list[int]:
        if not isinstance(key, bytes):
            return []
        try:
            text = key.decode()
        except UnicodeDecodeError as e:  # a string that ends (or starts) inside a UTF-8 character
            text = key[:e.start].decode()
        if text:  # the longest decodable prefix, tokenised as running text
            try:
                ids = self._encode(text)
            except Exception:  # noqa: BLE001 - a tokenizer that cannot encode it: no route
                ids = []
            if ids:
                return [int(ids[0])]
        return list(self._index.get(key[:1], []))   # its first byte, where the vocabulary has byte tokens


_VOCABS: dict[tuple, Vocab] = {}


def vocab_of(model) -> Vocab:
    """A loaded model's ``Vocab``, built once per tokenizer fingerprint and vocabulary size."""
    fp = (model.tokenizer_fingerprint(), int(model.info.vocab_size), getattr(model, "eos_id", None))
    v = _VOCABS.get(fp)
    if v is None:
        tb = model.token_bytes()
        if len(tb) != model.info.vocab_size:
            raise ArfuseError(f"{model.info.name}: {len(tb):,} token strings for {model.info.vocab_size:,} logits")
        v = _VOCABS[fp] = Vocab(model.info.name, tb, model.encode_piece, getattr(model, "eos_id", None))
    return v


def union_probs(logps: Sequence[torch.Tensor], vocabs: Sequence[Vocab], k: int,
                *, extra: Sequence[list] | None = None) -> tuple[list[list], torch.Tensor]:
    """Each row's union of the models' top-k strings and each model's probabilities renormalised
    over it: ``logps`` are the models' log-probs (B, V_m), the LLM first. Returns the keys (bytes,
    or ``EOS``) per row and q (K, B, U_max) float64, zero past a row's candidates. ``extra[b]`` adds
    keys to row b's union."""
    B = logps[0].shape[0]
    tops = [torch.topk(lp, min(k, lp.shape[-1]), dim=-1).indices.tolist() for lp in logps]
    keys: list[list] = []
    for b in range(B):
        seen: dict = {}
        for top, v in zip(tops, vocabs):
            for i in top[b]:
                key = v.key[i]
                if key is not None and key != b"":
                    seen[key] = None
        if extra is not None:
            for key in extra[b]:
                seen[key] = None
        if not seen:
            raise ArfuseError(f"the top-{k} union came out empty (every proposed token is a special token with no "
                              "string): raise --topk")
        keys.append(list(seen))
    U = max(len(r) for r in keys)
    q = torch.zeros(len(vocabs), B, U, dtype=torch.float64)
    for m, (lp, v) in enumerate(zip(logps, vocabs)):
        V = lp.shape[-1]
        idx, pos = [], []
        for b, row in enumerate(keys):
            for j, key in enumerate(row):
                for i in v.route(key):
                    if i < V:
                        idx.append(b * V + i)
                        pos.append(b * U + j)
        if idx:
            vals = lp.reshape(-1)[torch.tensor(idx, dtype=torch.long, device=lp.device)].double().exp().cpu()
            q[m].view(-1).index_add_(0, torch.tensor(pos, dtype=torch.long), vals)
        total = q[m].sum(-1, keepdim=True)
        q[m] = torch.where(total > 0, q[m] / total.clamp(min=1e-300), q[m])
    return keys, q


def union_step(logps: Sequence[torch.Tensor], vocabs: Sequence[Vocab], weights: Sequence[float], k: int,
               *, extra: Sequence[list] | None = None) -> tuple[list[list], torch.Tensor]:
    """The union rule at one position for each row: the candidate keys per row and their fused
    probabilities sum_m w_m q_m (B, U_max) (``union_probs``)."""
    keys, q = union_probs(logps, vocabs, k, extra=extra)
    return keys, sum(w * q[m] for m, w in enumerate(weights))


class UnionRule(Rule):
    """UniTE's top-k union across vocabularies, with the AR weights."""

    name = "union"
    paper = "UniTE, Determine-Then-Ensemble (Yao et al., ICLR 2025), with the AR weights"
    summary = ("the union of every model's top-k token strings, each model renormalised over it, mixed "
               "w q_LLM + (1 - w) q_SLM: models with different tokenizers")
    same_vocab = False
    over_tokens = True
    params = (Param("topk", "tokens each model proposes per step, k >= 1 (UniTE's k)", default=10, low=1,
                    option="--topk"),)

    def bind(self, models: Sequence) -> "UnionRule":
        self.check_models(len(models))
        self.vocabs = [vocab_of(m) for m in models]
        return self

    @property
    def k(self) -> int:
        k = self.values["topk"]
        if k != int(k) or k < 1:
            raise ArfuseError(f"union rule: topk {k} must be a whole number >= 1 (tokens each model proposes)")
        return int(k)

    def step(self, logps: Sequence[torch.Tensor], extra=None) -> tuple[list[list], torch.Tensor]:
        """Candidate keys and fused probabilities per row (``union_step``) with this rule's k and weights."""
        if self.weights is None:
            raise ArfuseError("the union rule needs its weights: give the LLM's weight w (--weight, e.g. 0.9)")
        if not hasattr(self, "vocabs"):
            raise ArfuseError("the union rule reads the models' vocabularies: bind it to the models first")
        return union_step(logps, self.vocabs, self.weights, self.k, extra=extra)

    def __call__(self, logps):
        """Over the LLM's vocabulary: each LLM token's fused probability where it is a candidate (its
        string's), -inf elsewhere; the scale on which a caller that knows only token ids can rank."""
        keys, fused = self.step(logps)
        v = self.vocabs[0]
        out = torch.full_like(logps[0], -math.inf, dtype=torch.float32)
        for b, row in enumerate(keys):
            for j, key in enumerate(row):
                ids = v.ids(key)
                if ids and fused[b, j] > 0:
                    out[b, ids[0]] = math.log(float(fused[b, j]))
        return out
