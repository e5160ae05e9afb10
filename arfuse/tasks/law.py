"""A model family for the AR law (``arfuse law``): load and score each member once (cached),
then hand the records to ``arfuse.search.law``, which never loads a model. Every evaluation
head has its records: one per token (causal LMs), per image (classifiers, all classes kept),
per masked residue (masked LMs, the whole vocabulary kept)."""
from __future__ import annotations

from arfuse.data.fasta import MaskConfig
from arfuse.errors import ArfuseError
from arfuse.scoring.scorer import ScoreConfig
from arfuse.search.law import Member
from arfuse.tasks.heads import head_for, head_module


def family_members(specs: list[str], data_spec: str, cfg: ScoreConfig = ScoreConfig(), *,
                   mask: MaskConfig = MaskConfig(), device: str = "cpu", dtype: str = "float32", batch_size: int = 4,
                   use_cache: bool = True, progress: bool = True,
                   num_parameters: dict | None = None) -> tuple[list[Member], dict]:
    """The family's members (records scored once, cached) and its data's description, for
    ``arfuse.search.law.analyse_family``; ``cfg`` is read for causal LMs, ``mask`` for masked LMs."""
    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models (comma-separated), got {len(specs)}: {specs}")
    head = head_module(head_for(specs))
    members, info = head.family_members(specs, data_spec, score_cfg=cfg, mask=mask, device=device, dtype=dtype,
                                        batch_size=batch_size, use_cache=use_cache, progress=progress)
    if num_parameters:
        for m in members:
            m.num_parameters = num_parameters.get(m.name, m.num_parameters)
    return members, info
