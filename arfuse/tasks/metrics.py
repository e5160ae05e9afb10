"""Perplexity metrics from corpus totals (summed log-likelihood over summed units), never
as a mean of per-document perplexities."""
from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)


def perplexity_metrics(logp: np.ndarray, nbytes: np.ndarray, nchars: np.ndarray, nwords: np.ndarray) -> dict:
    """Token and word perplexity, bits per byte and per character of per-token log-probs."""
    nll = -float(np.sum(logp, dtype=np.float64))
    n_tok, n_bytes, n_chars, n_words = len(logp), int(nbytes.sum()), int(nchars.sum()), int(nwords.sum())
    return {
        "nll": nll,
        "token_ppl": math.exp(nll / n_tok) if n_tok else math.nan,
        "word_ppl": math.exp(nll / n_words) if n_words else math.nan,
        "bits_per_byte": nll / LN2 / n_bytes if n_bytes else math.nan,
        "bits_per_char": nll / LN2 / n_chars if n_chars else math.nan,
        "tokens": n_tok, "bytes": n_bytes, "chars": n_chars, "words": n_words,
    }


def bootstrap_ppl_gain(base_logp: np.ndarray, fused_logp: np.ndarray, *, block: int = 1024, n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> dict:
    """The token-perplexity gain of ``fused`` over ``base`` in % (1 - PPL_fused / PPL_base) with a
    percentile interval from a paired bootstrap over contiguous blocks of ``block`` tokens.

    Blocks, not tokens, are resampled: neighbouring tokens' losses are correlated, and a token-level
    bootstrap would give intervals too narrow. Both models are resampled together (paired)."""
    base = np.asarray(base_logp, np.float64)
    fused = np.asarray(fused_logp, np.float64)
    if base.shape != fused.shape or base.ndim != 1:
        raise ValueError(f"bootstrap_ppl_gain: shapes {base.shape} and {fused.shape} differ")
    n = len(base)
    if n == 0:
        raise ValueError("bootstrap_ppl_gain: no tokens")
    starts = np.arange(0, n, block)
    d = np.add.reduceat(base - fused, starts)          # per block: NLL(fused) - NLL(base)
    cnt = np.diff(np.append(starts, n)).astype(np.float64)
    point = 100.0 * (1.0 - math.exp(d.sum() / n))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    gains = 100.0 * (1.0 - np.exp(d[idx].sum(1) / cnt[idx].sum(1)))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(gains, [a, 1.0 - a])
    return {"gain_pct": point, "ci_low": float(lo), "ci_high": float(hi), "level": level, "n_boot": n_boot,
            "block_tokens": block, "blocks": len(d), "seed": seed}
