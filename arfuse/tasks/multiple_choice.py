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
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arfuse.data.text import read_jsonl
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
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
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
