"""The union rule across tokenizers, teacher-forced on a text: its probability of the LLM's actual
next token, as token perplexity in the LLM's tokens and bits per byte.

The LLM reads the text in its own tokens (consecutive blocks of the window, as the segment records are cut). The
SLM reads the same text extended piece by piece, one LLM token's text at a time, exactly as it
does when the union rule generates (``arfuse.adapters.extend.TextExtender``): before LLM token
t+1 both models have read the same bytes. At each position the union rule (``arfuse.fusion.union``)
takes both models' top-k strings, renormalises each model over them and mixes w q_LLM +
(1 - w) q_SLM. Scored as a distribution over the LLM's tokens, the LLM's side is its own
probability (its top-k truncation would leave every target outside the union with nothing) and
the SLM's side is its renormalised union distribution carried onto the LLM's tokens by string: a
candidate that is an LLM token counts for that token, one that is not counts for its first LLM
sub-token (the map's route). So

    P(t) = w p_LLM(t) + (1 - w) q_SLM->LLM(t),

a distribution over the LLM's vocabulary; w = 1 is the LLM alone exactly, and the NLL is the linear
rule's convex problem: w is its exact optimum (the same Newton search). For each k of a grid, w is
chosen on the validation text and the best k is reported on the test text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from arfuse.adapters.base import CausalLM
from arfuse.adapters.extend import TextExtender
from arfuse.data.text import Dataset
from arfuse.errors import ArfuseError
from arfuse.fusion.linear import linear
from arfuse.fusion.union import union_probs, vocab_of
from arfuse.scoring.scorer import char_stats
from arfuse.scoring.windows import plan_windows
from arfuse.search.weights import optimal_weight

KS = (1, 2, 5, 10, 20, 50)


@dataclass
class UnionScores:
    """Per LLM target token: the LLM's log p, and per k the log of the SLM's union probability carried
    onto it (-inf where none of the union's strings leads to it); the bytes and words it closes."""

    ks: tuple[int, ...]
    lp_large: np.ndarray
    lq_small: dict[int, np.ndarray] = field(default_factory=dict)
    nbytes: np.ndarray | None = None
    nwords: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def coverage(self, k: int) -> float:
        """Share of targets the SLM's side reaches (some union string leads to them)."""
        return float(np.isfinite(self.lq_small[k]).mean())


def _logits_at(model: CausalLM, seq: list[int], lo: int, positions: list[int]) -> torch.Tensor:
    """Float32 log-probs (n, V) of ``model`` at ``positions`` of ``seq`` when it reads ``seq[lo:]``
    (in consecutive chunks of its context length when that is longer)."""
    hi = max(positions) + 1
    limit = model.info.max_length or (hi - lo)
    out = {}
    start = lo
    while start < hi:
        end = min(start + limit, hi)
        want = [p for p in positions if start <= p < end]
        if want:
            x = torch.tensor([seq[start:end]], dtype=torch.long, device=model.device)
            lp = torch.log_softmax(model.forward_logits(x)[0].float(), dim=-1)
            for p in want:
                out[p] = lp[p - start]
        start = end
    return torch.stack([out[p] for p in positions])


@torch.no_grad()
def score_union(large: CausalLM, small: CausalLM, dataset: Dataset, *, ks=KS, window: int = 1024, bos: str = "never",
                rows: int = 256, progress: bool = True) -> UnionScores:
    """Teacher-forced union-rule scores of ``dataset`` (see the module docstring)."""
    if not ks or min(ks) < 1:
        raise ArfuseError(f"union rule: top-k values {list(ks)} must be whole numbers >= 1")
    vl, vs = vocab_of(large), vocab_of(small)
    use_bos_l, use_bos_s = large.uses_bos(bos), small.uses_bos(bos)
    lp_large, nbytes = [], []
    lq: dict[int, list] = {k: [] for k in ks}
    from arfuse.progress import token_progress

    docs = []
    nwords = []
    for text in dataset.documents:
        enc = large.encode(text)
        ids = enc.ids
        pieces = [vl.key[i] for i in ids]
        if any(not isinstance(p, bytes) for p in pieces):
            bad = next(i for i, p in zip(ids, pieces) if not isinstance(p, bytes))
            raise ArfuseError(f"{large.info.name} tokenizes the text with token {bad}, which has no string form: "
                              "the union rule cannot align it")
        nb, _, nw = char_stats(text, enc.ends)
        if use_bos_l:
            ids, pieces, nb, nw = [large.bos_id] + ids, [b""] + pieces, [0, *nb], [0, *nw]
        ext = TextExtender(small)
        s_seq = [small.bos_id] if use_bos_s else []
        pos_s = []   # per LLM position: the SLM's last position once it has read the same text (-1: none)
        for p in pieces:
            if p:
                s_seq += ext.extend(p, (vs.ids(p) or [None])[0])
            pos_s.append(len(s_seq) - 1)
        docs.append((ids, pieces, s_seq, pos_s, np.asarray(nb), np.asarray(nw)))
    total = sum(max(len(d[0]) - 1, 0) for d in docs)
    with token_progress(f"union rule on {dataset.name} ({large.info.name} + {small.info.name})", total, 0,
                        enabled=progress) as advance:
        for ids, pieces, s_seq, pos_s, doc_nb, doc_nw in docs:
            for w in plan_windows(len(ids), window=window, convention="blocks"):
                x = torch.tensor([ids[w.ctx_start:w.tgt_end - 1]], dtype=torch.long, device=large.device)
                lpl_all = torch.log_softmax(large.forward_logits(x)[0].float(), dim=-1)   # (n_in, V_L)
                ps_all = [pos_s[t - 1] for t in range(w.tgt_start, w.tgt_end)]
                got = sorted({p for p in ps_all if p >= 0})
                lo = pos_s[w.ctx_start - 1] + 1 if w.ctx_start > 0 else 0
                # the SLM reads the same stretch of text (its own tokens) once per window
                lps_at = _logits_at(small, s_seq, min([lo, *got]), got) if got else None
                row_of = {p: r for r, p in enumerate(got)}
                flat = torch.full((small.info.vocab_size,), -math.log(small.info.vocab_size))
                for a in range(w.tgt_start, w.tgt_end, rows):
                    b = min(a + rows, w.tgt_end)
                    tg = list(range(a, b))
                    lpl = lpl_all[[t - 1 - w.ctx_start for t in tg]]
                    # no SLM token yet (the text so far is part of one character): a flat SLM
                    lps_full = torch.stack([lps_at[row_of[pos_s[t - 1]]] if pos_s[t - 1] >= 0 else flat for t in tg])
                    tgt_ids = torch.tensor([ids[t] for t in tg])
                    lp_large.append(lpl.gather(1, tgt_ids[:, None].to(lpl.device))[:, 0].double().cpu().numpy())
                    nbytes.append(doc_nb[a:b].astype(np.int64))
                    nwords.append(doc_nw[a:b].astype(np.int64))
                    for k in ks:
                        keys, q = union_probs([lpl, lps_full], [vl, vs], k)
                        qs = np.zeros(len(tg))   # the SLM's union probability carried onto the target token
                        q_small = q[1].numpy()
                        for r, (row, t) in enumerate(zip(keys, tgt_ids.tolist())):
                            for j, key in enumerate(row):
                                route = vl.route(key)
                                if route and route[0] == t:
                                    qs[r] += q_small[r, j]
                        with np.errstate(divide="ignore"):
                            lq[k].append(np.log(qs))
                    advance(len(tg))
    if not lp_large:
        raise ArfuseError(f"{dataset.name} gives no token to score with {large.info.name}")
    out = UnionScores(tuple(ks), np.concatenate(lp_large), nbytes=np.concatenate(nbytes), nwords=np.concatenate(nwords),
                      meta={"large": large.info.name, "small": small.info.name, "data": dataset.name,
                            "window": window, "convention": "blocks", "bos": bos})
    for k in ks:
        out.lq_small[k] = np.concatenate(lq[k])
    return out


def fit_union(valid: UnionScores, k: int | None = None, w: float | None = None) -> dict:
    """For each k (or the given one) on ``valid``: the exact NLL-optimal AR weight w (or the given w);
    the best k."""
    fits = {}
    for kk in ([k] if k is not None else valid.ks):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):   # the SLM side's zeros, at w = 0
            ww = float(w) if w is not None else optimal_weight(valid.lp_large, valid.lq_small[kk]).w
        fits[kk] = {"k": kk, "w": ww, "nll": -float(np.sum(mix_logp(valid, kk, ww))),
                    "coverage": valid.coverage(kk)}
    best = min(fits.values(), key=lambda f: f["nll"])
    return {"best": best, "by_k": fits}


def mix_logp(s: UnionScores, k: int, w: float) -> np.ndarray:
    """log P(target) = log(w p_LLM + (1 - w) q_SLM->LLM) at (k, w), per target."""
    return linear([s.lp_large.astype(np.float64), s.lq_small[k]], [w, 1.0 - w])


def bits_per_byte(logp: np.ndarray, nbytes: np.ndarray) -> float:
    return float(-np.sum(logp) / math.log(2) / np.sum(nbytes))


def add_union_row(report, cfg, models, data, valid, *, progress: bool = True) -> None:
    """Add the union rule's teacher-forced row to a cross-tokenizer report (``arfuse eval --rule union``):
    k from --param topk or the grid ``KS``, w given (--weight) or exact on --valid."""
    from arfuse.tasks.report import Row

    large, small = models
    k_given = cfg.rule_params.get("topk")
    if k_given is not None and (k_given != int(k_given) or k_given < 1):
        raise ArfuseError(f"union rule: topk {k_given} must be a whole number >= 1")
    ks = (int(k_given),) if k_given is not None else KS
    kw = dict(ks=ks, window=cfg.score.window, bos=cfg.score.bos, progress=progress)
    st = score_union(large, small, data, **kw)
    sv = score_union(large, small, valid, **kw) if valid is not None else st
    if cfg.weights is not None:
        best = fit_union(sv, k_given and int(k_given), w=cfg.weights[0])["best"]
        how = f"w given (--weight), k chosen on {sv.meta['data']}"
    else:
        best = fit_union(sv, k_given and int(k_given))["best"]
        how = f"k and w chosen on {sv.meta['data']} (w exact for each k)"
    k, w = best["k"], best["w"]
    lp = mix_logp(st, k, w)
    n, nb, nw = len(lp), int(st.nbytes.sum()), int(st.nwords.sum())
    metrics = {"bits_per_byte": bits_per_byte(lp, st.nbytes), "word_ppl": math.exp(-float(lp.sum()) / max(nw, 1)),
               "token_ppl": math.exp(-float(lp.mean())), "tokens": n, "bytes": nb, "words": nw,
               "nll": -float(lp.mean())}
    base = bits_per_byte(st.lp_large, st.nbytes)
    gain = 100.0 * (1.0 - metrics["bits_per_byte"] / base)
    report.rows.append(Row(f"union rule, teacher-forced (k = {k})", "rule", metrics, gain, [w, 1.0 - w]))
    ks_text = ", ".join(map(str, ks))
    report.data["union_rule"] = {"k": k, "w": w, "ks": list(ks), "coverage": st.coverage(k),
                                 "llm_bits_per_byte_same_bytes": base, "how": how, **metrics}
    report.notes.append(
        f"union rule (k = {k}, w = {w:.6f}): {how}, k from {{{ks_text}}}; scored on "
        f"{large.info.name}'s {n:,} tokens ({nb:,} bytes), {small.info.name} reading the same text piece by piece "
        f"as in generation; {large.info.name}'s side is its own probability, {small.info.name}'s its union "
        f"probability carried onto {large.info.name}'s tokens by string (it reaches {100 * st.coverage(k):.1f}% of "
        f"the targets); its gain is against {large.info.name} alone on the "
        f"same bytes ({base:.4f} bits/byte)")
