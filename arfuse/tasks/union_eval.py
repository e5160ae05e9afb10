"""The union rule across tokenizers, teacher-forced on a text: its probability of the LLM's actual
next token, as token perplexity in the LLM's tokens and bits per byte.

The LLM reads the text in its own tokens (disjoint windows, as lm-evaluation-harness rolls). The
SLM reads the same text extended piece by piece, one LLM token's text at a time, exactly as it
does when the union rule generates (``arfuse.adapters.extend.TextExtender``): before LLM token
t+1 both models have read the same bytes. At each position the union rule (``arfuse.fusion.union``)
takes both models' top-k strings, renormalises each model over them and mixes w q_LLM +
(1 - w) q_SLM. A target outside the union gets no mass from the rule, so the scored distribution
backs off to the LLM's own, P = (1 - lam) [w q_LLM + (1 - w) q_SLM] + lam p_LLM (a distribution
over strings: it never puts mass on the target twice). For each k of a grid the weights
(w, lam) are the exact optimum on the validation text (EM on the simplex of the three parts:
the NLL is convex in them); the best k on validation is reported on the test text.
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
from arfuse.fusion.union import union_probs, vocab_of
from arfuse.scoring.scorer import char_stats
from arfuse.scoring.windows import plan_windows
from arfuse.search.weights import optimal_weights_em

KS = (1, 2, 5, 10, 20)


@dataclass
class UnionScores:
    """Per LLM target token: the LLM's log p (alone), and per k the log of each model's renormalised
    probability of the target's string over the union (-inf outside it), and the target's bytes."""

    ks: tuple[int, ...]
    lp_large: np.ndarray
    lq_large: dict[int, np.ndarray] = field(default_factory=dict)
    lq_small: dict[int, np.ndarray] = field(default_factory=dict)
    nbytes: np.ndarray | None = None
    nwords: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def parts(self, k: int) -> list[np.ndarray]:
        return [self.lq_large[k], self.lq_small[k], self.lp_large]

    def coverage(self, k: int) -> float:
        """Share of targets whose string is in the union."""
        return float(np.isfinite(self.lq_large[k]).mean())


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
    lq = {k: ([], []) for k in ks}
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
            for w in plan_windows(len(ids), window=window, convention="disjoint"):
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
                    tgt_keys = [pieces[t] for t in tg]
                    tgt_ids = torch.tensor([ids[t] for t in tg])
                    lp_large.append(lpl.gather(1, tgt_ids[:, None].to(lpl.device))[:, 0].double().cpu().numpy())
                    nbytes.append(doc_nb[a:b].astype(np.int64))
                    nwords.append(doc_nw[a:b].astype(np.int64))
                    for k in ks:
                        keys, q = union_probs([lpl, lps_full], [vl, vs], k)
                        ql, qs = np.full(len(tg), -np.inf), np.full(len(tg), -np.inf)
                        for r, (row, key) in enumerate(zip(keys, tgt_keys)):
                            try:
                                j = row.index(key)
                            except ValueError:
                                continue
                            ql[r] = math.log(float(q[0, r, j])) if q[0, r, j] > 0 else -np.inf
                            qs[r] = math.log(float(q[1, r, j])) if q[1, r, j] > 0 else -np.inf
                        lq[k][0].append(ql)
                        lq[k][1].append(qs)
                    advance(len(tg))
    if not lp_large:
        raise ArfuseError(f"{dataset.name} gives no token to score with {large.info.name}")
    out = UnionScores(tuple(ks), np.concatenate(lp_large), nbytes=np.concatenate(nbytes), nwords=np.concatenate(nwords),
                      meta={"large": large.info.name, "small": small.info.name, "data": dataset.name,
                            "window": window, "convention": "disjoint", "bos": bos})
    for k in ks:
        out.lq_large[k] = np.concatenate(lq[k][0])
        out.lq_small[k] = np.concatenate(lq[k][1])
    return out


def fit_union(valid: UnionScores, k: int | None = None) -> dict:
    """The exact NLL-optimal (w, lam) for each k on ``valid`` (EM on the simplex of the three parts),
    and the best k (or the given one)."""
    fits = {}
    for kk in ([k] if k is not None else valid.ks):
        ws, it, ok = optimal_weights_em(valid.parts(kk))
        lam = float(ws[2])
        w = float(ws[0] / (ws[0] + ws[1])) if ws[0] + ws[1] > 0 else 1.0
        nll = -float(np.sum(mix_logp(valid, kk, w, lam)))
        fits[kk] = {"k": kk, "w": w, "lam": lam, "nll": nll, "em_iterations": it, "converged": ok,
                    "coverage": valid.coverage(kk)}
    best = min(fits.values(), key=lambda f: f["nll"])
    return {"best": best, "by_k": fits}


def mix_logp(s: UnionScores, k: int, w: float, lam: float) -> np.ndarray:
    """log P(target) of the backed-off union rule at (k, w, lam), per target."""
    with np.errstate(divide="ignore"):
        parts = np.stack(s.parts(k))
        lw = np.log(np.array([(1 - lam) * w, (1 - lam) * (1 - w), lam]))[:, None]
        z = parts + lw
        m = np.max(z, axis=0)
        return m + np.log(np.sum(np.exp(z - m), axis=0))


def bits_per_byte(logp: np.ndarray, nbytes: np.ndarray) -> float:
    return float(-np.sum(logp) / math.log(2) / np.sum(nbytes))


def add_union_row(report, cfg, models, data, valid, *, progress: bool = True) -> None:
    """Add the union rule's teacher-forced row to a cross-tokenizer report (``arfuse eval --rule union``):
    k from --param topk or the grid ``KS``, w given (--weight) or exact with the back-off on --valid."""
    from arfuse.tasks.report import Row

    large, small = models
    k_given = cfg.rule_params.get("topk")
    if k_given is not None and (k_given != int(k_given) or k_given < 1):
        raise ArfuseError(f"union rule: topk {k_given} must be a whole number >= 1")
    ks = (int(k_given),) if k_given is not None else KS
    kw = dict(ks=ks, window=cfg.score.window, bos=cfg.score.bos, progress=progress)
    st = score_union(large, small, data, **kw)
    sv = score_union(large, small, valid, **kw) if valid is not None else st
    if cfg.weights is not None:  # w given: only the back-off is fitted, for each k
        w = cfg.weights[0]
        fits = []
        for k in ks:
            with np.errstate(divide="ignore"):
                rule = np.logaddexp(np.log(w) + sv.lq_large[k], np.log1p(-w) + sv.lq_small[k]) if w < 1 else \
                    sv.lq_large[k]
            (a, lam), _, _ = optimal_weights_em([rule, sv.lp_large])
            fits.append({"k": k, "w": w, "lam": float(lam), "nll": -float(np.sum(mix_logp(sv, k, w, float(lam))))})
        best = min(fits, key=lambda f: f["nll"])
        how = f"w given (--weight); back-off weight exact on {sv.meta['data']}"
    else:
        best = fit_union(sv, k_given and int(k_given))["best"]
        how = f"k, w and the back-off weight chosen on {sv.meta['data']} (exact EM for each k)"
    k, w, lam = best["k"], best["w"], best["lam"]
    lp = mix_logp(st, k, w, lam)
    n, nb, nw = len(lp), int(st.nbytes.sum()), int(st.nwords.sum())
    metrics = {"bits_per_byte": bits_per_byte(lp, st.nbytes), "word_ppl": math.exp(-float(lp.sum()) / max(nw, 1)),
               "token_ppl": math.exp(-float(lp.mean())), "tokens": n, "bytes": nb, "words": nw,
               "nll": -float(lp.mean())}
    base = bits_per_byte(st.lp_large, st.nbytes)
    gain = 100.0 * (1.0 - metrics["bits_per_byte"] / base)
    report.rows.append(Row(f"union rule, teacher-forced (k = {k})", "rule", metrics, gain, [w, 1.0 - w]))
    ks_text = ", ".join(map(str, ks))
    report.data["union_rule"] = {"k": k, "w": w, "backoff": lam, "ks": list(ks), "coverage": st.coverage(k),
                                 "llm_bits_per_byte_same_bytes": base, "how": how, **metrics}
    report.notes.append(
        f"union rule (k = {k}, w = {w:.6f}, back-off {lam:.3g}): {how}, k from {{{ks_text}}}; scored on "
        f"{large.info.name}'s {n:,} tokens ({nb:,} bytes), {small.info.name} reading the same text piece by piece "
        f"as in generation; {100 * st.coverage(k):.1f}% of the targets are in the union, the others get the "
        f"back-off's share of {large.info.name}'s probability; its gain is against {large.info.name} alone on the "
        f"same bytes ({base:.4f} bits/byte)")
