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
