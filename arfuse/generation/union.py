"""Generation across tokenizers: the top-k union rule (``arfuse.fusion.union``), step by step.

Every model keeps its own token sequence and its own KV cache. At each step the union rule picks
a string (one model's token, by bytes); each model then extends its sequence by tokenizing only
that new text (``arfuse.adapters.extend.TextExtender``: the model's own token where the string is
one, an incomplete UTF-8 character carried forward until it resolves), so nothing it has seen
is fed again. Rows are batched with left padding: a row whose models take several tokens for the
new text, or none yet, is padded (masked), and a model that took no token keeps its last
distribution. UniTE's released code instead has the second model re-tokenize and re-read the whole
text at every step (``retokenize=True`` reproduces that loop for the benchmark).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from arfuse.adapters.base import CausalLM
from arfuse.adapters.extend import TextExtender
from arfuse.errors import ArfuseError
from arfuse.fusion.union import EOS, UnionRule
from arfuse.generation.config import GenerationConfig
from arfuse.generation.results import Chunk, GenerationResult, GenerationStats, emit
from arfuse.generation.sampling import sample, transform
from arfuse.generation.state import ModelState
from arfuse.generation.text_decoder import TextDecoder


def _text(data: bytes) -> str:
    """The longest prefix of ``data`` that is whole UTF-8 characters."""
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        if e.start >= len(data) - 3 and e.reason.startswith("unexpected end"):
            return data[:e.start].decode(errors="replace")
        return data.decode(errors="replace")


class _Row:
    def __init__(self, index: int, prompt: str, prompt_tokens: int, seed: int, n_models: int):
        self.index, self.prompt, self.prompt_tokens = index, prompt, prompt_tokens
        self.data = b""
        self.text = ""
        self.ids: list[int] = []          # the LLM's tokens of the generated text
        self.steps = 0
        self.emitted = 0
        self.reason: str | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self.fed = [0] * n_models         # tokens in each model's sequence (prompt included)

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt, self.text, self.ids, self.reason, self.prompt_tokens)


class UnionDecoder(TextDecoder):
    """Generates with a bound ``UnionRule`` from ``models`` (the LLM first), any tokenizers.

    ``fed_tokens[m]`` counts the tokens model m was fed (prompts included): with the incremental
    extension it equals the prompt tokens plus the tokens of the generated pieces, nothing twice."""

    def __init__(self, models: Sequence[CausalLM], rule: UnionRule, config: GenerationConfig, *,
                 retokenize: bool = False):
        if config.speculative is not None:
            raise ArfuseError("the union rule decodes step by step (speculative decoding verifies one tokenizer's "
                              "tokens): drop --speculative, or fuse models that share a tokenizer with --rule linear")
        self.models = list(models)
        self.rule = rule
        self.cfg = config
        self.retokenize = retokenize
        self.stats = GenerationStats(rule=rule.describe() + (", re-tokenizing every step" if retokenize else ""),
                                     mode="greedy" if config.greedy else "sampling")
        self.fed_tokens = [0] * len(self.models)
        self.unfed = [0] * len(self.models)   # tokens of each row's last piece: extended, never needed as input
        self.align_seconds = 0.0              # the union rule and the extension, outside the model calls
        self.results: list[GenerationResult] = []

    def _feed(self, m: int, state: ModelState, seqs: list[list[int]], last: torch.Tensor | None) -> torch.Tensor:
        """Feed model m each row's new tokens; its next-token log-probs per row (B, V), a row fed
        nothing keeping ``last``'s."""
        if not any(seqs):
            return last
        ids, mask = self._left_pad(seqs)
        with self._kernels():
            lp = state.feed(ids, mask)[:, -1]
        self.fed_tokens[m] += int(mask.sum())
        if last is not None:
            none = torch.tensor([not s for s in seqs])
            if none.any():
                lp = torch.where(none.to(lp.device)[:, None], last, lp)
        return lp

    # ---- the loop ------------------------------------------------------------------------
    def run(self, prompts: Sequence[str]) -> Iterator[Chunk]:
        cfg = self.cfg
        start = time.perf_counter()
        prompts = list(prompts)
        states = [ModelState(m) for m in self.models]
        contexts = self.check_prompts(prompts)   # every length checked before any model runs
        lps: list[torch.Tensor] = [self._feed(m, st, seqs, None) for m, (st, seqs) in enumerate(zip(states, contexts))]
        rows = [_Row(i, p, len(contexts[0][i]), cfg.seed + i, len(self.models)) for i, p in enumerate(prompts)]
        for m in range(len(self.models)):
            for r in rows:
                r.fed[m] = len(contexts[m][r.index])
        ext = [[TextExtender(model) for _ in prompts] for model in self.models]
        self.extenders, self.prompt_ids = ext, contexts   # what each model was fed, per row (tests, statistics)
        if self.retokenize:
            full = [[list(contexts[m][i]) for i in range(len(prompts))] for m in range(len(self.models))]
        active = list(range(len(prompts)))
        vocabs = self.rule.vocabs
        while active:
            t0 = time.perf_counter()
            keys, fused = self.rule.step(lps)                      # (B, U) probabilities over each row's union
            if not cfg.stop_at_eos:
                fused = fused * torch.tensor([[k != EOS for k in row] + [False] * (fused.shape[1] - len(row))
                                              for row in keys])
            choice = self._choose(fused, [rows[i] for i in active])
            news: list[list[list[int]]] = [[] for _ in self.models]
            keep = []
            for j, i in enumerate(active):
                row = rows[i]
                key = keys[j][choice[j]]
                if key == EOS:
                    row.reason = "eos"
                else:
                    got = [ext[m][i].extend(key, (vocabs[m].ids(key) or [None])[0]) for m in range(len(self.models))]
                    row.ids.extend(got[0])
                    row.data += key
                    row.steps += 1
                    self.stats.new_tokens += 1
                    self._stops(row)
                    if row.reason is None and any(
                            m.info.max_length is not None and row.fed[k] + len(got[k]) >= m.info.max_length
                            for k, m in enumerate(self.models)):
                        row.reason = "length"   # the next step would not fit a model's context
                chunk = emit(row, self.cfg.stop, [])
                if chunk is not None:
                    yield chunk
                if row.reason is not None and key != EOS:   # its last piece needs no feeding
                    for m in range(len(self.models)):
                        self.unfed[m] += len(got[m])
                if row.reason is None:
                    keep.append(j)
                    for m in range(len(self.models)):
                        row.fed[m] += len(got[m])
                        if self.retokenize and m:   # UniTE's loop: the other models re-read the whole text
                            full[m][i] = contexts[m][i] + self.models[m].encode(_text(row.data)).ids
                            news[m].append(full[m][i])
                        else:
                            news[m].append(got[m])
            self.align_seconds += time.perf_counter() - t0
            if keep and len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long)
                for st in states:
                    st.select(sel)
                lps = [lp[sel] for lp in lps]
            active = [active[j] for j in keep]
            if not active:
                break
            if self.retokenize:   # no cache for the other models: a fresh state over the whole text
                states[1:] = [ModelState(m) for m in self.models[1:]]
            lps = [self._feed(m, st, news[m], None if self.retokenize and m else lps[m])
                   for m, st in enumerate(states)]
            self.stats.cycles += 1
            self.stats.large_passes += 1
        self.stats.seconds = time.perf_counter() - start
        self.results = [r.result() for r in rows]

    def _choose(self, fused: torch.Tensor, rows: list[_Row]) -> list[int]:
        cfg = self.cfg
        if cfg.greedy:
            return fused.argmax(-1).tolist()
        logp = transform(fused.clamp(min=0).log().float(), cfg.temperature, cfg.top_k, cfg.top_p)
        u = torch.stack([torch.rand(1, generator=r.gen, dtype=torch.float64)[0] for r in rows])
        return sample(logp, u).tolist()

    def _stops(self, row: _Row) -> None:
        row.text = _text(row.data)
        hits = [i for i in (row.text.find(s) for s in self.cfg.stop) if i >= 0]
        if hits:
            row.text = row.text[:min(hits)]
            row.reason = "stop"
        elif row.steps >= self.cfg.max_new_tokens:
            row.reason = "length"
