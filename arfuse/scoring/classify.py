"""Score an image set with one classifier, once, into cached per-image records.

The records are ``TokenRecords`` with one row per image: ``doc`` the image's index,
``pos`` 0, ``target`` its label, ``logp`` the float32 log-probability of the true class,
``topk_ids``/``topk_logp`` the classes in the model's order of preference (all classes by
default, so fused predictions are exact at any weight); ``nbytes``/``nchars``/``nwords`` 0.
The same fusion, search and law code therefore runs on images as on text.
"""
from __future__ import annotations

import numpy as np
import torch

from arfuse.adapters.vision import ImageClassifier
from arfuse.errors import ArfuseError
from arfuse.scoring.cache import ScoreCache
from arfuse.scoring.records import TokenRecords
from arfuse.data.images import ImageDataset

CHUNK_IMAGES = 2000  # images per cache chunk: the unit of resumption


def image_cache_key(model: ImageClassifier, dataset: ImageDataset, k: int) -> dict:
    return {"task": "image-classification", "model": model.info.identity, "model_kind": model.info.kind,
            "dtype": "float32", "topk": k, "data": dataset.content_hash}


@torch.no_grad()
def _score_range(model: ImageClassifier, dataset: ImageDataset, lo: int, hi: int, k: int,
                 batch_size: int) -> TokenRecords:
    ids, lps, tids, tlps = [], [], [], []
    for b0 in range(lo, hi, batch_size):
        idx = range(b0, min(hi, b0 + batch_size))
        x = torch.stack([model.preprocess(dataset.decode(i)) for i in idx])  # (B, 3, H, W)
        lp = model.logprobs(x)                                      # (B, C) float32
        bad = ~torch.isfinite(lp).all(dim=1)
        if bad.any():
            i = idx[int(torch.nonzero(bad)[0, 0])]
            raise ArfuseError(f"{model.info.name} produced NaN or inf log-probabilities on image {dataset.files[i]}: "
                              "check its weights")
        y = torch.as_tensor([dataset.labels[i] for i in idx])
        top_lp, top_ids = lp.topk(k, dim=-1)
        ids.append(np.asarray(idx, np.int32))
        lps.append(lp.gather(1, y[:, None])[:, 0].numpy())
        tids.append(top_ids.int().numpy())
        tlps.append(top_lp.numpy())
    n = hi - lo
    z = np.zeros(n, np.int32)
    doc = np.concatenate(ids)
    return TokenRecords(doc=doc, pos=z.copy(), target=np.asarray(dataset.labels[lo:hi], np.int32),
                        logp=np.concatenate(lps).astype(np.float32), topk_ids=np.concatenate(tids).astype(np.int32),
                        topk_logp=np.concatenate(tlps).astype(np.float32), nbytes=z.copy(), nchars=z.copy(),
                        nwords=z.copy())


def score_images(model: ImageClassifier, dataset: ImageDataset, *, topk: int | None = None, batch_size: int = 256,
                 use_cache: bool = True, progress: bool = True) -> TokenRecords:
    """Per-image records of ``model`` on ``dataset``, scored once and cached (resumable by chunk)."""
    if batch_size < 1:
        raise ArfuseError(f"--batch-size must be at least 1, got {batch_size}")
    n_classes = len(model.classes)
    if tuple(dataset.classes) != tuple(model.classes):
        raise ArfuseError(f"{dataset.name} has classes ({', '.join(dataset.classes)}) that differ from "
                          f"{model.info.name}'s ({', '.join(model.classes)}): load the data with the model's classes")
    if topk is not None and topk < 1:
        raise ArfuseError(f"--topk must be at least 1, got {topk}")
    k = n_classes if topk is None else min(topk, n_classes)
    cache = ScoreCache(image_cache_key(model, dataset, k)) if use_cache else None
    bounds = [(lo, min(len(dataset), lo + CHUNK_IMAGES)) for lo in range(0, len(dataset), CHUNK_IMAGES)]
    parts: dict[int, TokenRecords] = {}
    for i in range(len(bounds)):
        rec = cache.load_chunk(i) if cache else None
        if rec is not None:
            parts[i] = rec
    todo = [i for i in range(len(bounds)) if i not in parts]
    if todo:
        from arfuse.progress import token_progress

        done = sum(bounds[i][1] - bounds[i][0] for i in parts)
        with token_progress(f"scoring {dataset.name} with {model.info.name}", len(dataset), done,
                            enabled=progress, unit="img") as advance:
            for i in todo:
                rec = _score_range(model, dataset, *bounds[i], k, batch_size)
                if cache:
                    cache.save_chunk(i, rec)
                parts[i] = rec
                advance(len(rec))
    if cache and not cache.manifest.get("complete"):
        cache.mark_complete(len(bounds), {"images": len(dataset)})
    size = getattr(model, "input_size", None)
    meta = {"model": model.info.name, "model_kind": model.info.kind, "num_parameters": model.info.num_parameters,
            "vocab_size": n_classes, "classes": list(model.classes), "data": dataset.name,
            "data_source": dataset.source, "data_hash": dataset.content_hash, "topk": k,
            "skipped": len(dataset.skipped), "cache_key": cache.key if cache else None, "unit": "image",
            "resized": sum(s != (size, size) for s in dataset.sizes) if size else 0}
    return TokenRecords.concat([parts[i] for i in range(len(bounds))], meta=meta)
