"""A model family for the AR law (``arfuse law``): load and score each member once (cached),
then hand the records to ``arfuse.search.law``, which never loads a model. Every evaluation
head has its records: one per token (causal LMs), per image (classifiers, all classes kept),
per masked residue (masked LMs, the whole vocabulary kept)."""
from __future__ import annotations

from arfuse.data.fasta import MaskConfig
from arfuse.errors import ArfuseError
from arfuse.scoring.scorer import ScoreConfig, score
from arfuse.search.law import Member
from arfuse.tasks.heads import head_for


def family_members(specs: list[str], data_spec: str, cfg: ScoreConfig = ScoreConfig(), *,
                   mask: MaskConfig = MaskConfig(), device: str = "cpu", dtype: str = "float32", batch_size: int = 4,
                   use_cache: bool = True, progress: bool = True,
                   num_parameters: dict | None = None) -> tuple[list[Member], dict]:
    """The family's members (records scored once, cached) and its data's description, for
    ``arfuse.search.law.analyse_family``; ``cfg`` is read for causal LMs, ``mask`` for masked LMs."""
    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models (comma-separated), got {len(specs)}: {specs}")
    kw = dict(device=device, batch_size=batch_size, use_cache=use_cache, progress=progress)
    head = head_for(specs)
    if head == "image":
        members, info = _image_members(specs, data_spec, **kw)
    elif head == "masked":
        members, info = _masked_members(specs, data_spec, mask, **kw)
    else:
        members, info = _causal_members(specs, data_spec, cfg, dtype=dtype, **kw)
    if num_parameters:
        for m in members:
            m.num_parameters = num_parameters.get(m.name, m.num_parameters)
    return members, info


def _causal_members(specs, data_spec, cfg: ScoreConfig, *, device, dtype, batch_size, use_cache, progress):
    """One record per token; every member needs the same tokenizer."""
    from arfuse.adapters import load_model
    from arfuse.data.text import load_dataset

    data = load_dataset(data_spec)
    models = [load_model(s, device=device, dtype=dtype) for s in specs]
    ref = models[0]
    for s, m in zip(specs[1:], models[1:]):
        if m.info.vocab_size != ref.info.vocab_size or m.tokenizer_fingerprint() != ref.tokenizer_fingerprint():
            raise ArfuseError(
                f"the family's tokenizers differ: {specs[0]} ({ref.info.vocab_size:,} tokens) and {s} "
                f"({m.info.vocab_size:,} tokens, {'another vocabulary' if m.info.vocab_size != ref.info.vocab_size else 'same size, other merges'}): "
                "the AR law's pairs fuse token by token, so every member needs the same tokenizer; "
                "compare models with different tokenizers with bits per byte (`arfuse score`)")
    members = []
    for s, m in zip(specs, models):
        rec = score(m, data, cfg, batch_size=batch_size, use_cache=use_cache, progress=progress)
        members.append(Member(m.info.name if m.info.name not in [x.name for x in members] else s, m.num_parameters,
                              rec, s))
    info = {"name": data.name, "source": data.source, "sha256": data.content_hash, "windowing": cfg.describe(),
            "tokens": len(members[0].records), "topk": cfg.topk}
    return members, info


def _image_members(specs, data_spec, *, device, batch_size, use_cache, progress):
    """One record per image, all classes kept."""
    from arfuse.tasks.classification import MIN_BATCH, score_family

    models, ds, recs = score_family(specs, data_spec, device=device, batch_size=max(batch_size, MIN_BATCH),
                                    use_cache=use_cache, progress=progress)
    members = [Member(m.info.name, m.num_parameters, r, s) for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash,
            "windowing": f"one record per image, all {len(ds.classes)} classes kept ({len(ds.skipped)} undecodable skipped)",
            "tokens": len(ds), "topk": len(ds.classes), "unit": "image", "skipped": len(ds.skipped)}
    return members, info


def _masked_members(specs, data_spec, mask: MaskConfig, *, device, batch_size, use_cache, progress):
    """One record per masked residue, the whole vocabulary kept (exact accuracy curves)."""
    from arfuse.tasks.masked_lm import score_family

    models, ds, recs = score_family(specs, data_spec, mask=mask, device=device, batch_size=batch_size,
                                    use_cache=use_cache, progress=progress)
    members = [Member(m.info.name, m.num_parameters, r, s) for s, m, r in zip(specs, models, recs)]
    info = {"name": ds.name, "source": ds.source, "sha256": ds.content_hash, "windowing": mask.describe(),
            "tokens": len(recs[0]), "topk": recs[0].topk_ids.shape[1], "unit": "masked residue"}
    return members, info
