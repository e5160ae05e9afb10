"""Multiple choice (ARC, the Children's Book Test): acc and acc_norm as lm-evaluation-harness
defines them, and the AR fusion of two models' answer distributions.

Each model scores every option as a continuation of the prompt: ``ll`` = summed log p of
the option's tokens. acc: argmax of ll is the gold option; acc_norm: argmax of ll divided
by the option's length in characters (lm-eval's ``completion_len``). Ties go to the first
option, as ``numpy.argmax`` does.

Fusion is over answers, the paper's classifier view (Appendix A): each model's
distribution over the options is the softmax of ll (for acc) or of ll / length (for
acc_norm), and the fused model picks argmax_c k p_L(c) + p_S(c). That is exact at every
k through the exchange thresholds (``arfuse.search.accuracy``), and needs no shared
tokenizer: any two models that can score text can be fused this way. Any other registered
rule that does not read the tokens themselves applies to the same answer distributions
(``fuse_answers``).

The finer alternative, the segment mixture within each option (``option_segments``): cut the
option at the byte offsets where both models end a token and score it by ll_seg(w) = sum over
its segments of log(w p_L(seg) + (1 - w) p_S(seg)) (``arfuse.scoring.segments`` within one
continuation; with one tokenizer each segment is one token). Its w is taken on a grid.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.data.text import read_jsonl, read_text
from arfuse.errors import ArfuseError
from arfuse.fusion.registry import Rule

W_GRID = np.linspace(0.0, 1.0, 1001)  # the w a rule without an exact accuracy curve is tried at


@dataclass
class MCExample:
    id: str
    context: str
    options: list[str]       # continuations as scored (with the leading delimiter)
    texts: list[str]         # the options as lm-eval's doc_to_choice gives them (for completion_len)
    gold: int
    where: str = ""          # file:line it came from


# ---- readers ------------------------------------------------------------------------------
def read_arc(path: str | Path, prompt: str = "Question: {question}\nAnswer:", choice: str = " {choice}",
             limit: int | None = None) -> list[MCExample]:
    """ARC-V1 jsonl: {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}."""
    out: list[MCExample] = []
    for where, obj in read_jsonl(path):
        lineno = int(where.rsplit(":", 1)[1])
        try:
            q = obj["question"]
            stem, choices, key = q["stem"], q["choices"], str(obj["answerKey"])
            texts = [str(c["text"]) for c in choices]
            labels = [str(c["label"]) for c in choices]
        except (KeyError, TypeError) as e:
            raise ArfuseError(f"{where}: an ARC line needs question.stem, question.choices[].text/.label and "
                              f"answerKey (missing {e})") from None
        if len(texts) < 2:
            raise ArfuseError(f"{where}: question {obj.get('id', lineno)!r} has {len(texts)} option: multiple "
                              "choice needs at least 2")
        if key not in labels:
            raise ArfuseError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        out.append(MCExample(str(obj.get("id", lineno)), prompt.format(question=stem),
                             [choice.format(choice=t) for t in texts], texts, labels.index(key), where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ArfuseError(f"{path} holds no questions")
    return out


_CBT_LINE = re.compile(r"^(\d+) (.*)$")


def read_cbt(path: str | Path, limit: int | None = None) -> list[MCExample]:
    """The Children's Book Test's text format: examples of 21 numbered lines, blank-line separated.

    Lines 1-20 are the context; line 21 is ``21 <query with XXXXX>\\t<answer>\\t\\t<c1|c2|...>``.
    Each option is the query's rest with the candidate in place of XXXXX, scored after the
    context and the query's start.
    """
    path = Path(path)
    out: list[MCExample] = []
    sents: list[str] = []
    start = 0
    for lineno, raw in enumerate(io.StringIO(read_text(path)), 1):   # lines split at "\n" only, as open() does
        line = raw.rstrip("\n")
        where = f"{path}:{lineno}"
        if not line.strip():
            if sents:
                raise ArfuseError(f"{where}: blank line inside an example (after {len(sents)} context lines; "
                                  "each example has 20 context lines and a query line 21)")
            continue
        m = _CBT_LINE.match(line)
        if not m:
            raise ArfuseError(f"{where}: a CBT line starts with its number and a space, got {line[:40]!r}")
        num, body = int(m[1]), m[2]
        if num != len(sents) + 1:
            raise ArfuseError(f"{where}: line number {num} where {len(sents) + 1} was expected")
        if not sents:
            start = lineno
        if num < 21:
            sents.append(body)
            continue
        parts = body.split("\t")
        if len(parts) != 4 or parts[2] != "":
            raise ArfuseError(f"{where}: the query line needs 'query<TAB>answer<TAB><TAB>c1|c2|...', "
                              f"got {len(parts)} tab-separated fields")
        query, answer, _, cands = parts
        options = [c for c in cands.split("|") if c]
        if len(options) < 2:
            raise ArfuseError(f"{where}: {len(options)} candidate: multiple choice needs at least 2")
        if answer not in options:
            raise ArfuseError(f"{where}: the answer {answer!r} is not among the candidates")
        if query.count("XXXXX") != 1:
            raise ArfuseError(f"{where}: the query must hold XXXXX exactly once (the missing word)")
        pre, post = query.split("XXXXX")
        context = " ".join(sents) + " " + pre
        texts = [c + post for c in options]
        out.append(MCExample(f"{path.name}:{start}", context, texts, texts, options.index(answer), where))
        sents = []
        if limit is not None and len(out) >= limit:
            break
    if sents:
        raise ArfuseError(f"{path}: the file ends inside an example starting at line {start} (no query line 21)")
    if not out:
        raise ArfuseError(f"{path} holds no examples")
    return out


# ---- metrics ------------------------------------------------------------------------------
@dataclass
class MCScores:
    """Per example: each option's summed log-likelihood, padded with -inf to the widest example."""

    ll: np.ndarray           # (N, C)
    length: np.ndarray       # (N, C) characters of each option's text (lm-eval's completion_len)
    valid: np.ndarray        # (N, C)
    gold: np.ndarray         # (N,)

    def predictions(self, norm: bool) -> np.ndarray:
        s = self.scores(norm)
        return np.where(self.valid, s, -np.inf).argmax(axis=1)

    def scores(self, norm: bool) -> np.ndarray:
        return self.ll / np.maximum(self.length, 1) if norm else self.ll

    def right(self, norm: bool) -> np.ndarray:
        return self.predictions(norm) == self.gold

    def probs(self, norm: bool) -> np.ndarray:
        """The model's distribution over each example's options (softmax of the scores)."""
        s = np.where(self.valid, self.scores(norm), -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=1, keepdims=True)

    def logprobs(self, norm: bool) -> np.ndarray:
        """The log of ``probs`` (-inf at padding), computed without underflow."""
        s = np.where(self.valid, self.scores(norm), -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            return s - np.log(np.exp(s).sum(axis=1, keepdims=True))

    def subset(self, idx) -> "MCScores":
        return MCScores(self.ll[idx], self.length[idx], self.valid[idx], self.gold[idx])


def mc_scores(examples: list[MCExample], loglik: np.ndarray) -> MCScores:
    """Arrange flat per-option log-likelihoods (examples in order, options in order) per example."""
    n = len(examples)
    c = max(len(e.options) for e in examples)
    ll = np.full((n, c), -np.inf)
    length = np.ones((n, c))
    valid = np.zeros((n, c), bool)
    i = 0
    for r, e in enumerate(examples):
        m = len(e.options)
        ll[r, :m] = loglik[i:i + m]
        length[r, :m] = [len(t) for t in e.texts]
        valid[r, :m] = True
        i += m
    return MCScores(ll, length, valid, np.array([e.gold for e in examples]))


def requests(examples: list[MCExample]) -> list[tuple[str, str]]:
    return [(e.context, o) for e in examples for o in e.options]


# ---- any registered rule over the answers ---------------------------------------------------
def fuse_answers(rule: Rule, logps: list[np.ndarray], valid: np.ndarray) -> np.ndarray:
    """The fused log-distribution over each question's options (N, C), -inf at padding.

    ``logps``: each model's log-probs over the options (N, C), the LLM first. Questions with the
    same number of options go to the rule together, so no padding ever reaches it.
    """
    import torch

    out = np.full(valid.shape, -np.inf)
    n_opt = valid.sum(axis=1)
    for c in np.unique(n_opt):
        rows = np.flatnonzero(n_opt == c)  # mc_scores fills each row's options from the left
        fused = rule([torch.as_tensor(np.ascontiguousarray(x[rows, :c]), dtype=torch.float64) for x in logps])
        out[rows, :c] = fused.numpy() if isinstance(fused, torch.Tensor) else np.asarray(fused)
    return out


def rule_right(rule: Rule, scores: list[MCScores], norm: bool) -> np.ndarray:
    """Per question: the fused model's pick under ``rule`` is the gold option (ties: the first)."""
    fused = fuse_answers(rule, [s.logprobs(norm) for s in scores], scores[0].valid)
    return np.where(scores[0].valid, fused, -np.inf).argmax(axis=1) == scores[0].gold


def choose_weight(rule: Rule, scores: list[MCScores], norm: bool, valid: np.ndarray) -> tuple[Rule, str]:
    """The weight w of two models with the most right answers on the questions ``valid``, over
    ``W_GRID`` (ties: the largest w, nearest the LLM, as the linear rule's exact curve chooses)."""
    best, best_w = -1, 1.0
    for w in W_GRID:
        n_right = int(rule_right(rule.replace(weights=[w, 1.0 - w]), scores, norm)[valid].sum())
        if n_right >= best:
            best, best_w = n_right, float(w)
    how = (f"the most accurate w on the validation part, on a grid of {len(W_GRID)} points in [0, 1] (ties: the "
           "largest w); not an exact curve")
    return rule.replace(weights=[best_w, 1.0 - best_w]), how


# ---- the segment mixture within each option (models with different tokenizers) --------------
@dataclass
class OptionSegments:
    """Every option cut at the byte offsets where both models end a token (``arfuse.scoring.segments``
    within one continuation), with each model's log-probability of each piece.

    Offsets are bytes of the continuation string as ``loglik.split_pair`` gives it (the context's
    trailing spaces moved in). A segment runs from the previous common boundary (0 for the first)
    to its end; a model's token belongs to the segment its end falls in, a token closing no byte
    to the segment of the next token that closes some, a first token that starts before offset 0
    (merged with the context's last characters) to the first segment. So the segments tile each
    option exactly and every model's log-probs of an option's segments sum to its whole-option ll.

    logp:    (2, S) float64, the large and the small model's log p of each segment
    request: (S,) the option (request index) of each segment, in request order
    start, end: (S,) the segment's byte span in its option's continuation string
    tokens:  (2,) each model's continuation tokens
    start_mismatch: (2,) options where the model's first token does not start at offset 0
    """

    logp: np.ndarray
    request: np.ndarray
    start: np.ndarray
    end: np.ndarray
    n_requests: int
    tokens: np.ndarray
    start_mismatch: np.ndarray
    token_level: bool        # one tokenization of every option: each segment is one token

    def __len__(self) -> int:
        return int(self.logp.shape[1])

    def logliks(self, ws, requests: np.ndarray | None = None) -> np.ndarray:
        """(len(ws), n_requests): ll_seg(w) = sum over an option's segments of log(w p_L + (1 - w) p_S),
        for each w of ``ws``; only the requests of the boolean mask ``requests`` (-inf elsewhere)."""
        ws = np.atleast_1d(np.asarray(ws, np.float64))
        out = np.full((len(ws), self.n_requests), -np.inf)
        keep = np.ones(len(self), bool) if requests is None else np.asarray(requests, bool)[self.request]
        if not keep.any():
            return out
        req = self.request[keep]
        lpl, lps = self.logp[0, keep], self.logp[1, keep]
        first = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])  # segments are in request order
        with np.errstate(divide="ignore"):
            lw, l1w = np.log(ws), np.log1p(-ws)
        step = max(1, 2_000_000 // max(len(req), 1))
        for a in range(0, len(ws), step):
            seg = np.logaddexp(lw[a:a + step, None] + lpl, l1w[a:a + step, None] + lps)  # (w, S)
            out[a:a + step, req[first]] = np.add.reduceat(seg, first, axis=1)
        return out

    def loglik(self, w: float) -> np.ndarray:
        """(n_requests,) ll_seg(w) of every option."""
        return self.logliks([w])[0]

    def model_loglik(self, i: int) -> np.ndarray:
        """(n_requests,) model ``i``'s summed log p of each option's segments (its whole-option ll)."""
        return np.bincount(self.request, weights=self.logp[i], minlength=self.n_requests)

    @property
    def totals(self) -> dict:
        return {"segments": len(self), "options": self.n_requests,
                "tokens_per_model": [int(t) for t in self.tokens], "token_level": self.token_level,
                "bytes": int((self.end - self.start).sum()),
                "options_first_token_off_start": [int(m) for m in self.start_mismatch]}


def _sorted_tokens(c, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(request, logp, nbytes, end offset, target) of a model's continuation tokens in (request, pos) order."""
    order = np.lexsort((c.records.pos, c.request))
    return (c.request.astype(np.int64)[order], c.token_logp()[order], c.records.nbytes.astype(np.int64)[order],
            c.token_ends(pairs)[order], c.records.target[order])


def option_segments(conts, pairs: list[tuple[str, str]] | None = None, *,
                    token_level: bool | None = None) -> OptionSegments:
    """The common segments of two models' continuations (``loglik.Continuations``, the large model
    first) of the same options. ``token_level`` (one tokenizer) defaults to whether the records carry
    one tokenizer fingerprint; it holds only where both models scored the very same tokens of every
    option (a shortened small-model context may tokenize an option's start otherwise): else the
    options are cut at their common byte boundaries. ``pairs``: the requests, for Continuations made
    without the continuations' lengths."""
    if len(conts) != 2:
        raise ArfuseError(f"the segment mixture fuses two models, got {len(conts)}")
    n = conts[0].n_requests
    if conts[1].n_requests != n:
        raise ArfuseError(f"the two models scored {n} and {conts[1].n_requests} options: score the same requests")
    toks = [_sorted_tokens(c, pairs) for c in conts]
    lens = [c.cont_bytes if c.cont_bytes is not None else None for c in conts]
    if lens[0] is not None and lens[1] is not None and not np.array_equal(lens[0], lens[1]):
        raise ArfuseError("the two models' continuations differ in length: score the same options")
    if token_level is None:
        fps = [c.records.meta.get("tokenizer") for c in conts]
        token_level = fps[0] is not None and fps[0] == fps[1]
    token_level = bool(token_level) and all(np.array_equal(toks[0][k], toks[1][k]) for k in (0, 4))
    mismatch = np.zeros(2, np.int64)
    for i, (req, _, nb, end, _) in enumerate(toks):
        first = np.r_[True, req[1:] != req[:-1]]
        mismatch[i] = int(((end - nb)[first] != 0).sum())
    if token_level:
        req, lpl, nb, end, _ = toks[0]
        first = np.r_[True, req[1:] != req[:-1]]
        end = np.maximum(end, 0)
        start = np.where(first, 0, np.r_[0, end[:-1]])
        return OptionSegments(np.stack([lpl, toks[1][1]]), req, start, end, n,
                              np.array([len(req), len(toks[1][0])]), mismatch, True)
    # a token's key: the offset its segment may end at (a byte-less token's: the next byte-closing one's)
    totals = None
    keys = []
    for req, _, nb, end, _ in toks:
        idx = np.arange(len(req))
        big = np.iinfo(np.int64).max
        nxt = np.minimum.accumulate(np.where(nb > 0, idx, big)[::-1])[::-1] if len(idx) else idx
        ok = nxt < big
        ok[ok] &= req[nxt[ok]] == req[ok]
        key = np.where(ok, end[np.where(ok, nxt, 0)], end)
        keys.append(key)
        last = np.r_[req[1:] != req[:-1], True]
        t = np.zeros(n, np.int64)
        t[req[last]] = end[last]
        totals = t if totals is None else totals
        if not np.array_equal(t, totals):
            raise ArfuseError("the two models' continuations end at different byte offsets: score the same options")
    base = np.r_[0, np.cumsum(totals + 1)[:-1]].astype(np.int64)  # options apart on one byte line
    glob = [base[t[0]] + np.maximum(k, 1) for t, k in zip(toks, keys)]  # keys <= 0: in the first segment
    common = np.intersect1d(np.unique(glob[0][keys[0] > 0]), np.unique(glob[1][keys[1] > 0]))
    creq = np.searchsorted(base, common, side="right") - 1
    cend = common - base[creq]
    first = np.r_[True, creq[1:] != creq[:-1]]
    cstart = np.where(first, 0, np.r_[0, cend[:-1]])
    if not np.array_equal(np.unique(creq), np.arange(n)) or not np.array_equal(cend[np.r_[first[1:], True]], totals):
        raise ArfuseError("the segment mixture found an option without its end as a common boundary: the records "
                          "do not match the options; rescore with --no-cache")
    logp = np.zeros((2, len(common)))
    for i, g in enumerate(glob):
        logp[i] = np.bincount(np.searchsorted(common, g, side="left"), weights=toks[i][1], minlength=len(common))
    return OptionSegments(logp, creq.astype(np.int64), cstart, cend, n, np.array([len(toks[0][0]), len(toks[1][0])]),
                          mismatch, False)


def segment_right(segs: OptionSegments, base: MCScores, examples: list[MCExample], ws, norm: bool,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """(len(ws), N) bool: the pick of the segment mixture at each w (argmax over a question's options of
    ll_seg(w), or of ll_seg(w) / completion_len for acc_norm; ties: the first) is the gold option.
    Only the questions ``rows`` are computed (the others are False)."""
    n_opt = np.array([len(e.options) for e in examples])
    r_of = np.repeat(np.arange(len(examples)), n_opt)
    c_of = np.concatenate([np.arange(m) for m in n_opt])
    rows = np.arange(len(examples)) if rows is None else np.asarray(rows)
    local = np.full(len(examples), -1)
    local[rows] = np.arange(len(rows))
    sel = local[r_of] >= 0
    ll = segs.logliks(ws, sel)[:, sel]  # (W, options of the rows)
    M = np.full((ll.shape[0], len(rows), base.ll.shape[1]), -np.inf)
    M[:, local[r_of[sel]], c_of[sel]] = ll
    if norm:
        M = M / np.maximum(base.length[rows], 1)[None]
    M = np.where(base.valid[rows][None], M, -np.inf)
    out = np.zeros((ll.shape[0], len(examples)), bool)
    out[:, rows] = M.argmax(axis=2) == base.gold[rows][None]
    return out


def choose_segment_weight(segs: OptionSegments, base: MCScores, examples: list[MCExample], norm: bool,
                          valid: np.ndarray, grid: np.ndarray = W_GRID) -> tuple[float, int]:
    """(w, right answers on ``valid``): the weight of the segment mixture with the most right answers on
    the questions ``valid``, over ``grid`` (ties: the largest w, nearest the LLM, as ``choose_weight``)."""
    n_right = segment_right(segs, base, examples, grid, norm, rows=valid)[:, valid].sum(axis=1)
    j = len(grid) - 1 - int(np.argmax(n_right[::-1]))
    return float(grid[j]), int(n_right[j])
