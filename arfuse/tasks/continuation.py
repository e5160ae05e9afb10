"""Continuation of held-out text: a quality measure of any generation strategy that needs no judge model.

For ``n`` passages evenly spaced through a held-out data set, each strategy continues the prompt (the
passage's text up to a word boundary) greedily; its output is compared with the text that truly
follows by chrF (character n-gram F-score, sacrebleu's ``CHRF``: character order 6, no word n-grams,
beta 2), at corpus level and per passage. Beside it, a column no strategy can change: the LLM's own
negative log-likelihood of the true continuation given the prompt (teacher-forced, one batched pass),
a check that every strategy saw the same prompts and references.

``continuation_passages`` cuts the passages; ``chrf`` scores texts; ``continuation_nll`` scores the
true continuations with a model; ``run_continuations`` times a generation function over the
passages at a batch size and ``segment_summary`` condenses segment-level statistics (SpecFuse: the
segments each model won, when models exited) over its batches. ``benchmarks/bench_strategies.py``
puts them together.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.data.text import Dataset, load_dataset
from arfuse.errors import ArfuseError

__all__ = ["Passage", "continuation_passages", "ChrfScores", "chrf", "ContinuationNLL", "continuation_nll",
           "ContinuationRun", "run_continuations", "segment_summary"]

_VERSE = re.compile(r"\n(?=\s*\d+ )")   # a numbered verse (KJV), else any line start


# ---- passages ---------------------------------------------------------------------------------
@dataclass
class Passage:
    """A prompt and the text that truly follows it: ``prompt + continuation == text[start:end]`` of
    the data set's documents joined by newlines."""

    prompt: str
    continuation: str
    start: int          # character offset of the prompt in the joined text

    @property
    def end(self) -> int:
        return self.start + len(self.prompt) + len(self.continuation)


def continuation_passages(dataset: str | Dataset, n: int, prompt_chars: int = 350, cont_chars: int = 1000, *,
                          model: CausalLM | None = None, cont_tokens: int | None = None) -> list[Passage]:
    """``n`` passages evenly spaced through ``dataset`` (a spec such as ``"kjv[95%:]"`` or a loaded
    ``Dataset``; its documents joined by newlines). Passage i starts at the first line start after
    ``i / n`` of the text (a numbered KJV verse where there is one, as ``benchmarks/bench_generate.passages``
    cuts them: the prompts are the same); its prompt is the next ``prompt_chars`` characters cut
    before their last space, so the model continues mid-sentence at a word boundary; its continuation
    is the text that follows, ``cont_chars`` characters cut before their last whitespace, or, with
    ``model`` and ``cont_tokens``, the text of the first ``cont_tokens`` tokens of that in ``model``'s
    tokenization as a continuation (``encode_piece``): the true text a generator of ``cont_tokens``
    tokens should have written."""
    if n < 1:
        raise ArfuseError(f"passages: n = {n} must be at least 1")
    if prompt_chars < 2 or cont_chars < 2:
        raise ArfuseError("passages: prompt_chars and cont_chars must be at least 2 characters")
    if (model is None) != (cont_tokens is None):
        raise ArfuseError("passages: give both model and cont_tokens (continuations of so many of its tokens) or neither")
    ds = load_dataset(dataset) if isinstance(dataset, str) else dataset
    text = "\n".join(ds.documents)
    out = []
    for i in range(n):
        at = i * len(text) // n
        m = _VERSE.search(text, at)
        a = (m.start() if m else text.find("\n", at)) + 1   # find() == -1: from the start of the text
        window = text[a:a + prompt_chars]
        cut = window.rfind(" ")
        if cut < 1:
            raise ArfuseError(f"passage {i} of {ds.name} (at character {a:,}) has no space within {prompt_chars} "
                              "characters to cut its prompt at: give a larger prompt_chars")
        prompt = window[:cut]
        b = a + cut
        rest = text[b:b + cont_chars + 1]   # one more: a continuation that ends right before whitespace is whole
        if len(rest) > cont_chars:
            ws = max(rest.rfind(c, 1) for c in " \n\t")
            rest = rest[:ws] if ws > 0 else rest[:cont_chars]
        if model is not None:
            rest = _first_tokens(model, rest, cont_tokens)
        if not rest.strip():
            raise ArfuseError(f"passage {i} of {ds.name} (at character {a:,}) has no text after its prompt: "
                              "use fewer passages or a longer data set")
        out.append(Passage(prompt, rest, a))
    return out


def _first_tokens(model: CausalLM, text: str, k: int) -> str:
    """The text of the first ``k`` tokens of ``text`` read as a continuation by ``model``."""
    ids = model.encode_piece(text)
    if len(ids) <= k:
        return text
    tb = model.token_bytes()
    data = b"".join(tb[t] or b"" for t in ids[:k])
    return data.decode("utf-8", errors="ignore")   # a character split by the cut is dropped


# ---- chrF -------------------------------------------------------------------------------------
@dataclass
class ChrfScores:
    corpus: float                     # chrF of all passages together (sacrebleu's corpus statistics)
    per_passage: list[float]          # sentence-level chrF of each passage

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_passage)) if self.per_passage else math.nan


def _chrf_metric():
    try:
        from sacrebleu.metrics import CHRF
    except ImportError as e:   # an extra, not a core dependency
        raise ArfuseError("chrF needs sacrebleu: pip install 'arfuse[bench]' (or sacrebleu==2.4.3)") from e
    return CHRF()


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> ChrfScores:
    """chrF (0-100; sacrebleu's ``CHRF()``: character 6-grams, beta 2) of ``hypotheses`` against one
    reference each: corpus level and per passage."""
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ArfuseError(f"chrF: {len(hyps)} hypotheses for {len(refs)} references")
    metric = _chrf_metric()
    corpus = metric.corpus_score(hyps, [refs]).score if hyps else math.nan
    per = [metric.sentence_score(h, [r]).score for h, r in zip(hyps, refs)]
    return ChrfScores(float(corpus), [float(x) for x in per])


# ---- the true continuation's likelihood -------------------------------------------------------
@dataclass
class ContinuationNLL:
    """A model's negative log-likelihood (nats) of each true continuation given its prompt."""

    model: str
    nll: list[float]            # per passage, summed over the continuation's tokens
    tokens: list[int]           # per passage: the continuation's tokens in this model's tokenization
    nbytes: list[int]           # per passage: UTF-8 bytes of the continuation

    @property
    def nats_per_token(self) -> float:
        return float(sum(self.nll) / sum(self.tokens))

    @property
    def bits_per_byte(self) -> float:
        return float(sum(self.nll) / math.log(2) / sum(self.nbytes))

    def as_dict(self) -> dict:
        return {"model": self.model, "nats_per_token": self.nats_per_token, "bits_per_byte": self.bits_per_byte,
                "tokens": int(sum(self.tokens)), "bytes": int(sum(self.nbytes))}


def continuation_ids(model: CausalLM, prompt: str, continuation: str, *, bos: str = "auto") -> tuple[list[int], int]:
    """(the sequence to score, where the continuation starts in it): BOS (by ``bos``) and the prompt's
    tokens, as generation reads a prompt, then the continuation's tokens as running text
    (``encode_piece``); a tokenizer without a string form of its tokens tokenizes the whole text and
    gives the continuation every token that ends past the prompt."""
    pre = [model.bos_id] if model.uses_bos(bos) else []
    try:
        p_ids, c_ids = model.encode(prompt).ids, model.encode_piece(continuation)
    except ArfuseError:
        enc = model.encode(prompt + continuation)
        k = sum(1 for e in enc.ends if e <= len(prompt))
        p_ids, c_ids = enc.ids[:k], enc.ids[k:]
    if not pre + p_ids:
        raise ArfuseError(f"an empty prompt and {model.info.name} adds no BOS token: nothing to condition on")
    if not c_ids:
        raise ArfuseError(f"a continuation {continuation!r} with no tokens in {model.info.name}'s tokenization")
    seq = pre + p_ids + c_ids
    limit = model.info.max_length
    if limit is not None and len(seq) > limit:   # keep the continuation and the prompt's last tokens
        drop = len(seq) - limit
        if drop > len(p_ids):
            raise ArfuseError(f"a continuation of {len(c_ids)} tokens does not fit {model.info.name}'s context "
                              f"of {limit:,} tokens")
        seq = pre + p_ids[drop:] + c_ids
    return seq, len(seq) - len(c_ids)


@torch.no_grad()
def continuation_nll(model: CausalLM, prompts: Sequence[str], continuations: Sequence[str], *, bos: str = "auto",
                     batch_size: int = 8) -> ContinuationNLL:
    """``model``'s NLL of each true continuation given its prompt, teacher-forced: the sequences
    (``continuation_ids``) right-padded into batches of ``batch_size``, one forward pass each (a
    causal model's positions never see the padding after them)."""
    if len(prompts) != len(continuations):
        raise ArfuseError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    if batch_size < 1:
        raise ArfuseError(f"batch_size {batch_size} must be at least 1")
    items = [continuation_ids(model, p, c, bos=bos) for p, c in zip(prompts, continuations)]
    pad = model.eos_id if model.eos_id is not None else 0
    nll: list[float] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, (s, _) in enumerate(chunk):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
        lo = min(c for _, c in chunk)
        logits = model.forward_logits(ids.to(model.device), mask.to(model.device))[:, lo - 1:width - 1]
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()   # (B, width - lo, V): predicts positions lo..width-1
        for b, (s, c) in enumerate(chunk):
            tgt = torch.tensor(s[c:])
            rows = lp[b, c - lo:len(s) - lo]
            nll.append(-float(rows.gather(1, tgt[:, None]).double().sum()))
    return ContinuationNLL(model.info.name, nll, [len(s) - c for s, c in items],
                           [len(c.encode()) for c in continuations])


# ---- running a strategy -----------------------------------------------------------------------
@dataclass
class ContinuationRun:
    """One strategy's continuations of some passages at one batch size, timed."""

    batch: int
    texts: list[str]
    tokens: int                 # the LLM's tokens of the generated texts, all passages
    seconds: float
    stats: list = field(default_factory=list)   # the GenerationStats of each call (one per batch)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def as_dict(self) -> dict:
        return {"batch": self.batch, "passages": len(self.texts), "tokens": self.tokens, "seconds": self.seconds,
                "tok_s": self.tok_s}


def run_continuations(fn: Callable[[list[str]], list], prompts: Sequence[str], batch: int) -> ContinuationRun:
    """Call ``fn`` (a list of prompts -> a list of ``GenerationResult``s) on ``prompts`` ``batch`` at a
    time; the texts, the LLM's tokens of them (``token_ids``), the wall time of the calls and each
    call's stats."""
    if batch < 1:
        raise ArfuseError(f"batch {batch} must be at least 1")
    prompts = list(prompts)
    texts, stats, n = [], [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        res = fn(prompts[i:i + batch])
        if len(res) != len(prompts[i:i + batch]):
            raise ArfuseError(f"the generation function gave {len(res)} results for {len(prompts[i:i + batch])} prompts")
        texts += [r.text for r in res]
        n += sum(len(r.token_ids) for r in res)
        stats.append(res[0].stats)
    return ContinuationRun(batch, texts, n, time.perf_counter() - t0, stats)


def segment_summary(stats: Sequence) -> dict:
    """Segment-level statistics (``SegmentStats``, one per call) summed over calls: per model, the
    share of decided rounds (a winner chosen) whose winning segment it drafted (alone or with others
    that drafted the same text), the share it won alone, and its exits (prompts where it exited, the
    round after which it did: median, min, max); the share of rounds where every drafter agreed."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return {}
    models = stats[0].models
    K = len(models)
    decided, agreed = 0, 0
    won, alone = [0] * K, [0] * K
    exit_rounds: list[list[int]] = [[] for _ in range(K)]
    prompts, new_tokens = 0, 0
    for s in stats:
        new_tokens += s.new_tokens
        for row in s.log:
            for drafters, _verifiers, winners in row:
                if not winners:
                    continue
                decided += 1
                agreed += int(len(drafters) > 1 and set(winners) == set(drafters))
                for m in winners:
                    won[m] += 1
                if len(winners) == 1:
                    alone[winners[0]] += 1
        for row in s.exits:
            prompts += 1
            for m, r in enumerate(row):
                if r is not None:
                    exit_rounds[m].append(int(r))
    per_model = {}
    for m, name in enumerate(models):
        ex = exit_rounds[m]
        per_model[name] = {
            "won": won[m] / decided if decided else math.nan,
            "won_alone": alone[m] / decided if decided else math.nan,
            "exited_prompts": len(ex), "exited_share": len(ex) / prompts if prompts else math.nan,
            "exit_round_median": statistics.median(ex) if ex else None,
            "exit_round_min": min(ex) if ex else None, "exit_round_max": max(ex) if ex else None,
        }
    return {"rounds": decided, "prompts": prompts, "all_drafters_agreed": agreed / decided if decided else math.nan,
            "tokens_per_round": new_tokens / decided if decided else math.nan, "models": per_model}
