"""What generation hands back: chunks of text as they come, each prompt's result, the call's
statistics; and each prompt's row of output, with the stop rules that end it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from arfuse.adapters.base import CausalLM
from arfuse.generation.config import GenerationConfig


@dataclass
class Chunk:
    """New text of one prompt, as it comes: ``index`` is the prompt's position in the input list."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # set on a prompt's last chunk: "length", "stop" or "eos"


@dataclass
class GenerationResult:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats | None = None   # of the whole call (shared by a batch's results)


@dataclass
class GenerationStats:
    rule: str
    mode: str
    new_tokens: int = 0
    seconds: float = 0.0
    cycles: int = 0
    large_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)
    cycles_by_draft: dict[str, int] = field(default_factory=dict)   # speculative cycles by drafter: "slm",
    # "lookup", "slm+copies" (hybrid: the rows with a copy drafted it, the SLM drafted the others)
    draft_seconds: float = 0.0           # drafting in speculative cycles (model drafts: the drafter's steps)
    verify_seconds: float = 0.0          # verifying passes of speculative cycles
    draft_head: str = "full"             # "candidates": the drafter's head scored a candidate set while drafting
    draft_vocab: int = 0                 # the candidate set's final size
    draft_head_covered: int = 0          # drafted positions whose exact best SLM token was in the candidate set
    draft_head_positions: int = 0

    @property
    def draft_head_coverage(self) -> float | None:
        """Share of drafted positions where the SLM's exact best token was among its candidates."""
        return self.draft_head_covered / self.draft_head_positions if self.draft_head_positions else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts over drafted tokens (None without speculation)."""
        return self.accepted / self.drafted if self.drafted else None


class Row:
    """One prompt's output so far, its random stream, and the LLM's prompt token ids (``context``:
    lookup drafting searches them too)."""

    def __init__(self, index: int, prompt: str, context: list[int], seed: int):
        self.index, self.prompt, self.context = index, prompt, context
        self.prompt_tokens = len(context)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.reason: str | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt, self.text, self.ids, self.reason, self.prompt_tokens)


def commit(row: Row, tokens: list[int], cfg: GenerationConfig, tok: CausalLM) -> Chunk | None:
    """Append a cycle's tokens to ``row`` up to the first stop (EOS, a stop string, the length
    limit); the chunk of text that is now certain, or None when there is nothing to send."""
    new: list[int] = []
    for t in tokens:
        if cfg.stop_at_eos and tok.eos_id is not None and t == tok.eos_id:
            row.reason = "eos"
            break
        row.ids.append(t)
        new.append(t)
        row.text = tok.decode(row.ids)
        hits = [i for i in (row.text.find(s) for s in cfg.stop) if i >= 0]
        if hits:
            row.text = row.text[:min(hits)]
            row.reason = "stop"
            break
        if len(row.ids) >= cfg.max_new_tokens:
            row.reason = "length"
            break
    return emit(row, cfg.stop, new)


def emit(row, stop: list[str], new_ids: list[int]) -> Chunk | None:
    """The chunk of ``row``'s text (``index``, ``text``, ``emitted``, ``reason``) that is now certain,
    with ``new_ids``; None when there is nothing to send. While the row goes on, an incomplete UTF-8
    character and text that may start a stop string wait. Every decoder sends its chunks through it."""
    safe = row.text
    if row.reason is None:
        safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next byte
        hold = max((k for s in stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        safe = safe[:len(safe) - hold]  # text that may start a stop string waits too
    delta = safe[row.emitted:] if len(safe) > row.emitted else ""
    row.emitted = max(row.emitted, len(safe))
    if delta or new_ids or row.reason:
        return Chunk(row.index, delta, new_ids, row.reason)
    return None
