"""Windows over a long token sequence: every target scored exactly once.

A window is (ctx_start, tgt_start, tgt_end) over a sequence ``s`` (BOS included when the
policy adds one): the model reads ``s[ctx_start:tgt_end-1]`` and scores targets
``s[t]`` for ``tgt_start <= t < tgt_end``, each predicted from the logits at ``t-1``.
Targets are positions 1..n-1 of ``s``; without BOS the first token has no context and is
never scored.

Two conventions:
- ``sliding`` (the Hugging Face perplexity guide): windows of ``window`` tokens start every
  ``stride`` tokens; each scores only the targets no earlier window scored, so every
  target but those of the first window sees at least ``window - stride`` tokens of context.
  (With stride == window the guide skips each window's first token; arfuse then starts each
  window one token earlier so that every token is still scored exactly once.)
- ``disjoint`` (lm-evaluation-harness 0.4.13's ``loglikelihood_rolling``, exactly): the scorer
  puts a prefix token before the text (the tokenizer's BOS, else its EOS, as lm-eval's
  ``prefix_token_id``), so ``s[0]`` is that token and every token of the text is a target. The first
  window reads ``s[0:window]`` and scores targets 1..window; each next window scores the next
  ``window`` targets from the one token before them (lm-eval's ``get_rolling_token_windows`` with
  ``context_len=1`` and ``make_disjoint_window``); the last, shorter window reads back a full
  ``window`` of input, as lm-eval cuts it. Cheapest; each window but the first and the last
  conditions on one token of earlier context.
- ``blocks`` (nanoGPT's and ``arfuse train``'s validation cut; what ``disjoint`` was before it
  followed lm-eval exactly): consecutive blocks of ``window`` targets, no prefix token, each
  window reading the token before its targets, the last one short.
"""
from __future__ import annotations

from dataclasses import dataclass

from arfuse.errors import ArfuseError

CONVENTIONS = ("sliding", "disjoint", "blocks")


@dataclass(frozen=True)
class Window:
    ctx_start: int
    tgt_start: int
    tgt_end: int

    @property
    def input_len(self) -> int:
        return self.tgt_end - 1 - self.ctx_start

    @property
    def n_targets(self) -> int:
        return self.tgt_end - self.tgt_start


def plan_windows(n: int, *, window: int, stride: int | None = None, convention: str = "sliding") -> list[Window]:
    """Windows covering targets 1..n-1 of a sequence of ``n`` tokens, each exactly once."""
    if convention not in CONVENTIONS:
        raise ArfuseError(f"unknown window convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    if window < 1:
        raise ArfuseError(f"--window must be at least 1, got {window}")
    out: list[Window] = []
    if n < 2:
        return out
    if convention == "disjoint":
        # lm-eval: the first window predicts s[1:window+1] from s[0:window] (s[0] the prefix token)
        end = min(window + 1, n)
        out.append(Window(0, 1, end))
        while end < n:
            a, end = end, min(end + window, n)
            # the input is the ``window`` tokens before the last target: one token of context for a
            # full window, a full window read back for the last, shorter one
            out.append(Window(end - 1 - window, a, end))
        return out
    if convention == "blocks":
        a = 0
        while a + 1 < n:
            out.append(Window(a, a + 1, min(a + window + 1, n)))
            a += window
        return out
    if window < 2:
        raise ArfuseError(f"--window must be at least 2 with the sliding convention, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ArfuseError(f"--stride must be between 1 and --window ({window}), got {stride}")
    prev_end = 1  # first scorable target
    begin = 0
    while True:
        # with stride == window the guide would leave each window's first token unscored:
        # start one token earlier so that token gets its context and every target is scored once
        start = min(begin, prev_end - 1)
        end = min(start + window, n)
        if end > prev_end:
            out.append(Window(start, prev_end, end))
            prev_end = end
        if end == n:
            break
        begin += stride
    return out
