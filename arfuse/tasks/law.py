"""A model family for the AR law (``arfuse law``): load and score each member once (cached),
then hand the records to ``arfuse.search.law``, which never loads a model."""
from __future__ import annotations

from arfuse.adapters import load_model
from arfuse.data.text import load_dataset
from arfuse.errors import ArfuseError
from arfuse.scoring.scorer import score
from arfuse.search.law import Member


def family_members(specs: list[str], data_spec: str, cfg, *, device: str = "cpu", dtype: str = "float32",
                   batch_size: int = 4, use_cache: bool = True, progress: bool = True,
                   num_parameters: dict | None = None) -> tuple[list[Member], dict]:
    """Load and score each model once (cached); check they share one tokenizer."""
    if len(specs) < 2:
        raise ArfuseError(f"--family needs at least 2 models (comma-separated), got {len(specs)}: {specs}")
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
        n_par = (num_parameters or {}).get(m.info.name, m.num_parameters)
        members.append(Member(m.info.name if m.info.name not in [x.name for x in members] else s, n_par, rec, s))
    info = {"name": data.name, "source": data.source, "sha256": data.content_hash, "windowing": cfg.describe(),
            "tokens": len(members[0].records), "topk": cfg.topk}
    return members, info
