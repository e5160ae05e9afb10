"""What the decoders of text share (the union rule's and SpecFuse's): models that exchange text rather
than token ids, each with its own tokens. Every prompt is tokenized by every model and checked
against every context before any model runs; batches are left-padded; each model's few-row kernels
are made once per run."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.generation.config import GenerationConfig


class TextDecoder:
    """The shared part of a decoder over ``models`` with the settings ``cfg``."""

    models: list[CausalLM]
    cfg: GenerationConfig
    _few_row: list | None = None
    _checked: tuple[list[str], list[list[list[int]]]] | None = None

    # ---- prompts -------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str]) -> list[list[list[int]]]:
        """Every model's token ids of every prompt, ``[model][prompt]``, each checked against that
        model's context (``truncate="left"`` drops the oldest tokens) before any model runs: a prompt
        too long for any model fails at once. ``run`` calls it; a caller may call it first (the CLI,
        before echoing the prompt)."""
        prompts = list(prompts)
        checked = self._checked
        if checked is not None and checked[0] == prompts:
            return checked[1]
        n = len(prompts)
        ids = [[self._prompt_ids(m, p, "prompt" if n == 1 else f"prompt {i + 1} of {n}")
                for i, p in enumerate(prompts)] for m in self.models]
        self._checked = (prompts, ids)
        return ids

    def _headroom(self) -> int:
        """Positions a row may use past max_new_tokens (speculative sampling's last drafts)."""
        return 0

    def _prompt_ids(self, model: CausalLM, text: str, label: str = "prompt") -> list[int]:
        ids = model.encode(text).ids
        bos = [model.bos_id] if model.uses_bos(self.cfg.bos) else []
        limit = model.info.max_length
        c = self.cfg
        headroom = self._headroom()
        if limit is not None and len(bos) + len(ids) + c.max_new_tokens + headroom > limit:
            room = limit - c.max_new_tokens - headroom - len(bos)
            if c.truncate == "left" and room >= 1:
                ids = ids[len(ids) - room:]
            else:
                raise ArfuseError(
                    f"{label} ({len(bos) + len(ids):,} tokens) plus {c.max_new_tokens} new tokens"
                    + (f" and {headroom} drafts" if headroom else "")
                    + f" exceeds {model.info.name}'s context of {limit:,} tokens: shorten the prompt, lower "
                    "max_new_tokens (--max-new-tokens)"
                    + ("" if c.truncate == "left" else ", or pass truncate='left' (--truncate left) to drop "
                       "the prompt's oldest tokens"))
        if not bos + ids:
            raise ArfuseError(f"the {label} is empty and {model.info.name} adds no BOS token: give some text "
                              "(or --bos always)")
        return bos + ids

    def _kernels(self):
        """Every model's few-row kernels switched on (``arfuse.adapters.kernels``), made once per run."""
        if self._few_row is None:
            unique = list({id(m): m for m in self.models}.values())
            self._few_row = [m.fast_kernels() for m in unique] if self.cfg.fast_kernels else []
        stack = contextlib.ExitStack()
        for k in self._few_row:
            stack.enter_context(k.active())
        return stack

    @staticmethod
    def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for b, s in enumerate(seqs):
            if s:
                ids[b, width - len(s):] = torch.tensor(s)
                mask[b, width - len(s):] = True
        return ids, mask
