"""Score a data set with one model, once, into cached per-token records."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.errors import ArfuseError
from arfuse.scoring import shards
from arfuse.scoring.cache import ScoreCache, cache_warning, resume_note
from arfuse.scoring.records import TokenRecords
from arfuse.scoring.windows import Window, plan_windows
from arfuse.data.text import Dataset

CHUNK_TARGETS = 16384  # targets per cache chunk: the unit of resumption


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that changes a score, besides the model and the data."""

    window: int = 1024
    stride: int | None = 512
    convention: str = "sliding"   # "sliding" (HF guide), "disjoint" (lm-eval rolling) or "blocks" (nanoGPT)
    bos: str = "auto"             # "auto" (tokenizer default), "always", "never"
    topk: int = 32

    def describe(self) -> str:
        if self.convention == "sliding":
            return f"sliding window {self.window}, stride {self.stride} (Hugging Face guide)"
        if self.convention == "blocks":
            return f"consecutive blocks of {self.window} (nanoGPT's validation cut, no prefix token)"
        return (f"disjoint windows of {self.window} (lm-evaluation-harness 0.4.13 loglikelihood_rolling: a prefix "
                "token, BOS else EOS, before each document, so its first token is scored; the last window reads "
                "back a full window)")


@dataclass
class _Doc:
    seq: np.ndarray        # (n,) token ids, BOS first when used
    nbytes: np.ndarray     # (n,) bytes closed by each position (0 for BOS)
    nchars: np.ndarray
    nwords: np.ndarray


def char_stats(text: str, ends: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bytes, characters and words closed by each token, from its character end offsets."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    byte_len = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    cum_bytes = np.concatenate([[0], np.cumsum(byte_len)])
    is_space = np.frompyfunc(str.isspace, 1, 1)(np.array(list(text), dtype=object)).astype(bool) if text else np.zeros(0, bool)
    # a word ends at i+1 where char i is not space and char i+1 is space (or the text ends)
    nxt_space = np.append(is_space[1:], True)
    word_end = np.flatnonzero(~is_space & nxt_space) + 1
    e = np.asarray(ends, dtype=np.int64)
    prev = np.concatenate([[0], e[:-1]])
    nbytes = cum_bytes[e] - cum_bytes[prev]
    nchars = e - prev
    nwords = np.searchsorted(word_end, e, side="right") - np.searchsorted(word_end, prev, side="right")
    return nbytes.astype(np.int32), nchars.astype(np.int32), nwords.astype(np.int32)


def prefix_token(model: CausalLM, cfg: ScoreConfig) -> int | None:
    """The token the disjoint convention reads before each document, lm-eval's ``prefix_token_id``
    (the tokenizer's BOS, else its EOS); None for the sliding convention."""
    if cfg.convention != "disjoint":
        return None
    tok = model.bos_id if model.bos_id is not None else model.eos_id
    if tok is None:
        raise ArfuseError(f"{model.info.name} has neither a BOS nor an EOS token, which the disjoint convention "
                          "(lm-evaluation-harness rolling) reads before each document: use --convention sliding")
    return int(tok)


def prepare_docs(model: CausalLM, dataset: Dataset, bos: bool, prefix: int | None = None) -> list[_Doc]:
    """Token ids and per-token bytes, characters and words of each document: BOS first when ``bos``,
    and before it the ``prefix`` token when one is given (``prefix_token``; lm-eval puts it before
    the tokenizer's own BOS too). Neither closes any text."""
    lead = ([] if prefix is None else [prefix]) + ([model.bos_id] if bos else [])
    docs = []
    for text in dataset.documents:
        enc = model.encode(text)
        nb, nc, nw = char_stats(text, enc.ends)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if lead:
            z = np.zeros(len(lead), np.int32)
            ids, nb, nc, nw = np.concatenate([lead, ids]).astype(np.int64), np.concatenate([z, nb]), np.concatenate([z, nc]), np.concatenate([z, nw])
        docs.append(_Doc(ids, nb, nc, nw))
    return docs


def cache_key_fields(model: CausalLM, dataset: Dataset, cfg: ScoreConfig, bos: bool) -> dict:
    return {
        "model": model.info.identity, "model_kind": model.info.kind,
        "tokenizer": model.tokenizer_fingerprint(), "dtype": str(model.dtype).replace("torch.", ""),
        "bos": bos, "window": cfg.window, "stride": cfg.stride if cfg.convention == "sliding" else None,
        "convention": cfg.convention, "topk": cfg.topk, "data": dataset.content_hash,
        # the disjoint windows as lm-eval 0.4.13 cuts them, after its prefix token (older caches had neither)
        **({"disjoint_cut": "lm-eval-0.4.13", "prefix": prefix_token(model, cfg)} if cfg.convention == "disjoint" else {}),
    }


def _chunks(plan: list[tuple[int, Window]]) -> list[list[tuple[int, Window]]]:
    """Consecutive windows grouped into chunks of about CHUNK_TARGETS targets (fixed by the plan alone)."""
    out, cur, n = [], [], 0
    for item in plan:
        cur.append(item)
        n += item[1].n_targets
        if n >= CHUNK_TARGETS:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def _score_windows(model: CausalLM, docs: list[_Doc], items: list[tuple[int, Window]], k: int,
                   batch_size: int) -> TokenRecords:
    """Records of the targets of ``items``, in order; windows batched by equal input length."""
    results: dict[int, tuple] = {}
    by_len: dict[int, list[int]] = {}
    for j, (_, w) in enumerate(items):
        by_len.setdefault(w.input_len, []).append(j)
    for length, idxs in by_len.items():
        for b0 in range(0, len(idxs), batch_size):
            batch = idxs[b0:b0 + batch_size]
            inp = torch.as_tensor(np.stack([docs[items[j][0]].seq[items[j][1].ctx_start:items[j][1].tgt_end - 1] for j in batch]))
            n_keep = max(items[j][1].n_targets for j in batch)
            logits = model.forward_logits_tail(inp.to(model.device), n_keep)  # (B, n_keep, V)
            for row, j in enumerate(batch):
                d, w = items[j]
                n_t = w.n_targets
                lp = torch.log_softmax(logits[row, n_keep - n_t:].float(), dim=-1)  # (n_t, V)
                tgt = torch.as_tensor(docs[d].seq[w.tgt_start:w.tgt_end]).to(lp.device)
                lpt = lp.gather(1, tgt[:, None])[:, 0]
                bad = ~torch.isfinite(lp).all(dim=1)
                if bad.any():
                    pos = w.tgt_start + int(torch.nonzero(bad)[0, 0])
                    raise ArfuseError(f"{model.info.name} produced NaN or inf log-probabilities at document {d}, "
                                      f"token position {pos}: check its weights and dtype (try --dtype float32)")
                top_lp, top_ids = lp.topk(k, dim=-1)
                results[j] = (d, w, lpt.cpu().numpy(), top_ids.int().cpu().numpy(), top_lp.cpu().numpy())
            del logits
    parts = []
    for j in range(len(items)):
        d, w, lpt, tid, tlp = results[j]
        doc = docs[d]
        sl = slice(w.tgt_start, w.tgt_end)
        parts.append(TokenRecords(
            doc=np.full(w.n_targets, d, np.int32), pos=np.arange(w.tgt_start, w.tgt_end, dtype=np.int32),
            target=doc.seq[sl].astype(np.int32), logp=lpt.astype(np.float32), topk_ids=tid.astype(np.int32),
            topk_logp=tlp.astype(np.float32), nbytes=doc.nbytes[sl], nchars=doc.nchars[sl], nwords=doc.nwords[sl]))
    return TokenRecords.concat(parts)


def score(model: CausalLM, dataset: Dataset, cfg: ScoreConfig = ScoreConfig(), *, batch_size: int = 4,
          use_cache: bool = True, progress: bool = True, load: bool = True,
          workers: "shards.Workers | int | None" = None) -> TokenRecords | None:
    """Per-token records of ``model`` on ``dataset``, scored once and cached.

    An interrupted run resumes from its last finished chunk (saying so on stderr unless
    ``progress=False``); a damaged cache entry is rescored with a warning. A cache folder that
    cannot be written is an ArfuseError before any scoring; a write that fails later is a
    warning and the records are kept in memory. With ``load=False`` nothing is kept in memory
    (for filling the cache of a corpus of any length). ``workers`` (a ``shards.Workers`` or a
    count) shards the windows over Ray actors (``arfuse.scoring.shards``): the same records.
    """
    if batch_size < 1:
        raise ArfuseError(f"--batch-size must be at least 1, got {batch_size}")
    if cfg.topk < 1:
        raise ArfuseError(f"--topk must be at least 1, got {cfg.topk}")
    bos = model.uses_bos(cfg.bos)
    max_len = model.info.max_length
    if max_len is not None and cfg.window > max_len:
        raise ArfuseError(f"--window {cfg.window} exceeds {model.info.name}'s context of {max_len} tokens: "
                          f"use --window {max_len} or less")
    k = min(cfg.topk, model.info.vocab_size)
    key_fields = cache_key_fields(model, dataset, cfg, bos)
    cache = ScoreCache(key_fields) if use_cache else None
    meta = {"model": model.info.name, "model_kind": model.info.kind, "num_parameters": model.info.num_parameters,
            "vocab_size": model.info.vocab_size, "data": dataset.name, "data_source": dataset.source,
            "data_hash": dataset.content_hash, "bos": bos, "prefix": prefix_token(model, cfg), "topk": k, "windowing": cfg.describe(),
            "config": asdict(cfg), "cache_key": cache.key if cache else None,
            "tokenizer": model.tokenizer_fingerprint()}
    if cache and load and cache.manifest.get("complete") and cache.manifest.get("n_chunks"):
        # a finished run: its chunks are the whole answer, no need to tokenize the data again
        done = []
        for i in range(int(cache.manifest["n_chunks"])):
            rec = cache.load_chunk(i)
            if rec is None:  # damaged or missing: the slow path below rescores what is needed
                done = None
                break
            done.append(rec)
        want = cache.manifest.get("summary", {}).get("targets")
        if done is not None and want is not None and sum(map(len, done)) != want:
            cache_warning(f"score cache {cache.dir} holds {sum(map(len, done)):,} records where its manifest "
                          f"promises {want:,}: rescoring")
            cache.manifest.update(chunks={}, complete=False)
            done = None
        if done is not None:
            return TokenRecords.concat(done, meta=meta)
    docs = prepare_docs(model, dataset, bos, prefix_token(model, cfg))
    plan = [(d, w) for d, doc in enumerate(docs)
            for w in plan_windows(len(doc.seq), window=cfg.window, stride=cfg.stride, convention=cfg.convention)]
    if not plan:
        raise ArfuseError(f"{dataset.name} gives no token to score with {model.info.name} "
                          "(each document needs at least two tokens, or one with --bos always)")
    chunks = _chunks(plan)
    total = sum(w.n_targets for _, w in plan)
    parts: list[TokenRecords] = []
    todo = []
    for i, items in enumerate(chunks):
        rec = cache.load_chunk(i) if cache else None
        if rec is None:
            todo.append(i)
        elif load:
            parts.append((i, rec))
    if todo:
        from arfuse.progress import token_progress

        done_targets = total - sum(sum(w.n_targets for _, w in chunks[i]) for i in todo)
        resume_note(len(chunks) - len(todo), len(chunks), done_targets, total, "tokens", enabled=progress)
        with token_progress(f"scoring {dataset.name} with {model.info.name}", total, done_targets, enabled=progress) as advance:
            # in this process, or sharded over Ray workers (``workers``, or those of an open
            # ``shards.scale_out``): the same chunks either way, as each is finished
            for i, rec in shards.score_chunks(model, docs, chunks, todo, k, batch_size, advance,
                                              workers=workers if workers is not None else shards.active()):
                if cache and not cache.save_chunk(i, rec) and not load:
                    raise ArfuseError(f"the score cache folder {cache.dir} cannot be written, and with load=False "
                                      "nothing else keeps the records: free the space or set "
                                      "ARFUSE_CACHE=<a writable folder>")
                if load:
                    parts.append((i, rec))
    if cache and not cache.manifest.get("complete"):
        cache.mark_complete(len(chunks), {"targets": total})
    if not load:
        return None
    parts.sort(key=lambda t: t[0])
    return TokenRecords.concat([p for _, p in parts], meta=meta)
