"""Score a protein data set with one masked LM, once, into cached per-masked-position records.

The records are ``TokenRecords`` with one row per masked residue: ``doc`` the record's
index, ``pos`` the residue's index in its sequence, ``target`` the true residue id,
``logp`` its float32 log-probability, ``topk_ids``/``topk_logp`` the model's preferences
(the whole vocabulary by default), ``nbytes``/``nchars`` 1 (one residue), ``nwords`` 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from arfuse.errors import ArfuseError
from arfuse.scoring.cache import ScoreCache
from arfuse.scoring.records import TokenRecords
from arfuse.data.fasta import MaskConfig, ProteinDataset, mask_positions

CHUNK_CROPS = 512  # crops per cache chunk: the unit of resumption


@dataclass
class MaskedInput:
    """One crop ready for the model: ids with <cls>/<eos>, the masked token positions."""

    doc: int                 # record index
    start: int               # residue index of the crop's first residue
    ids: np.ndarray          # (T,) masked input ids, <cls> ... <eos>
    positions: np.ndarray    # (m,) token positions that are masked (1-based in ids: residue r at r - start + 1)
    targets: np.ndarray      # (m,) the true residue ids there


def masked_inputs(model, dataset: ProteinDataset, cfg: MaskConfig) -> list[MaskedInput]:
    """Every crop of every record with its masks; raises on a residue outside the alphabet."""
    out = []
    for d, rec in enumerate(dataset.records):
        ids = np.asarray(model.encode(rec.sequence, rec.id), np.int64)
        masked = mask_positions(rec.sequence, cfg.rate, cfg.seed)
        for start in range(0, len(ids), cfg.max_residues):
            end = min(len(ids), start + cfg.max_residues)
            m = masked[(masked >= start) & (masked < end)]
            if len(m) == 0:
                continue
            x = np.concatenate([[model.cls_id], ids[start:end], [model.eos_id]])
            pos = m - start + 1
            x[pos] = model.mask_id
            out.append(MaskedInput(d, start, x, pos, ids[m]))
    return out


def masked_cache_key(model, dataset: ProteinDataset, cfg: MaskConfig, k: int) -> dict:
    return {"task": "masked-lm", "model": model.info.identity, "model_kind": model.info.kind,
            "tokenizer": model.tokenizer_fingerprint(), "dtype": "float32", "mask": asdict(cfg), "topk": k,
            "data": dataset.content_hash}


@torch.no_grad()
def _score(model, crops: list[MaskedInput], k: int, batch_size: int, advance) -> TokenRecords:
    """Records of every masked position, in (record, residue) order; crops batched longest first."""
    order = sorted(range(len(crops)), key=lambda i: -len(crops[i].ids))
    out: dict[int, tuple] = {}
    for b0 in range(0, len(order), batch_size):
        batch = [crops[i] for i in order[b0:b0 + batch_size]]
        T = max(len(c.ids) for c in batch)
        ids = torch.full((len(batch), T), model.pad_id, dtype=torch.long)
        am = torch.zeros((len(batch), T), dtype=torch.long)
        for r, c in enumerate(batch):
            ids[r, :len(c.ids)] = torch.as_tensor(c.ids)
            am[r, :len(c.ids)] = 1
        lp = model.logprobs(ids, am)  # (B, T, V) float32
        for r, (i, c) in enumerate(zip(order[b0:b0 + batch_size], batch)):
            rows = lp[r, torch.as_tensor(c.positions)]  # (m, V)
            if not torch.isfinite(rows).all():
                raise ArfuseError(f"{model.info.name} produced NaN or inf log-probabilities on record {c.doc}: check its weights")
            tgt = torch.as_tensor(c.targets)
            top_lp, top_ids = rows.topk(k, dim=-1)
            out[i] = (rows.gather(1, tgt[:, None])[:, 0].cpu().numpy(), top_ids.int().cpu().numpy(), top_lp.cpu().numpy())
        advance(sum(len(c.positions) for c in batch))
    parts = []
    for i, c in enumerate(crops):
        lpt, tid, tlp = out[i]
        m = len(c.positions)
        one = np.ones(m, np.int32)
        parts.append(TokenRecords(doc=np.full(m, c.doc, np.int32), pos=(c.positions - 1 + c.start).astype(np.int32),
                                  target=c.targets.astype(np.int32), logp=lpt.astype(np.float32),
                                  topk_ids=tid.astype(np.int32), topk_logp=tlp.astype(np.float32),
                                  nbytes=one, nchars=one.copy(), nwords=np.zeros(m, np.int32)))
    return TokenRecords.concat(parts)


def score_masked(model, dataset: ProteinDataset, cfg: MaskConfig = MaskConfig(), *, topk: int | None = None,
                 batch_size: int = 8, use_cache: bool = True, progress: bool = True) -> TokenRecords:
    """Per-masked-position records of ``model`` on ``dataset``, scored once and cached."""
    if batch_size < 1:
        raise ArfuseError(f"--batch-size must be at least 1, got {batch_size}")
    if cfg.max_residues > model.max_residues:
        raise ArfuseError(f"crops of {cfg.max_residues} residues exceed {model.info.name}'s {model.max_residues}: "
                          f"use max_residues={model.max_residues} or less")
    k = model.info.vocab_size if topk is None else min(topk, model.info.vocab_size)
    crops = masked_inputs(model, dataset, cfg)  # validates every residue before any work
    cache = ScoreCache(masked_cache_key(model, dataset, cfg, k)) if use_cache else None
    chunks = [crops[a:a + CHUNK_CROPS] for a in range(0, len(crops), CHUNK_CROPS)]
    parts = {i: r for i in range(len(chunks)) if cache and (r := cache.load_chunk(i)) is not None}
    todo = [i for i in range(len(chunks)) if i not in parts]
    if todo:
        from arfuse.progress import token_progress

        total = sum(len(c.positions) for c in crops)
        done = sum(len(c.positions) for i in parts for c in chunks[i])
        with token_progress(f"scoring {dataset.name} with {model.info.name}", total, done, enabled=progress,
                            unit="res") as advance:
            for i in todo:
                parts[i] = _score(model, chunks[i], k, batch_size, advance)
                if cache:
                    cache.save_chunk(i, parts[i])
    if cache and not cache.manifest.get("complete"):
        cache.mark_complete(len(chunks), {"masked": sum(len(p) for p in parts.values())})
    rec = TokenRecords.concat([parts[i] for i in range(len(chunks))])
    rec.meta = {"model": model.info.name, "model_kind": model.info.kind, "num_parameters": model.num_parameters,
                "vocab_size": model.info.vocab_size, "data": dataset.name, "data_source": dataset.source,
                "data_hash": dataset.content_hash, "mask": asdict(cfg), "topk": k,
                "cache_key": cache.key if cache else None, "unit": "masked residue"}
    return rec
