"""Perplexity of the cosine-similarity AR variant (`arfuse eval --rule cosine`), beside the linear rule.

P(v) ∝ p_LLM(v) s(v, a)^p with a = argmax p_SLM (arfuse.fusion.cosine). The SLM enters only
through its argmax, which its cached records hold (top-1); the LLM's whole distribution enters
the normaliser, so the LLM is run once more over the data (arfuse.scoring.full) and nothing of
size V per token is kept: the test set is reduced window by window, and the power search keeps
the validation set's LLM distributions in memory (refused, with the fix, past MAX_VALID_BYTES).
"""
from __future__ import annotations

import numpy as np
import torch

from arfuse.errors import ArfuseError
from arfuse.fusion.cosine import check_power, cosine_target_logprobs, optimal_power, unit_rows
from arfuse.scoring.full import full_logprob_pass
from arfuse.scoring.scorer import score
from arfuse.data.text import load_dataset
from arfuse.tasks.metrics import bootstrap_ppl_gain, perplexity_metrics
from arfuse.tasks.perplexity import EvalConfig, EvalReport, Row, evaluate

MAX_VALID_BYTES = 3 * 2 ** 30
ROWS = 256


def _check_complete(done: int, want: int, name: str) -> None:
    if done != want:
        raise ArfuseError(f"{name}: the full-distribution pass gave {done:,} targets, the cached records hold "
                          f"{want:,}; rescore with --no-cache")


def _check_targets(got: torch.Tensor, want: np.ndarray, at: int, name: str) -> None:
    if not np.array_equal(got.numpy(), want[at:at + len(got)]):
        raise ArfuseError(f"{name}: the full-distribution pass does not line up with the cached records at target "
                          f"{at}; rescore with --no-cache")


def evaluate_cosine(cfg: EvalConfig, power: float | None = None, *, embeddings: str = "large",
                    progress: bool = True) -> EvalReport:
    """The linear report of ``evaluate`` (searched or given w) plus a cosine row at ``power``
    (None: the exact NLL-optimal power on --valid, else on the test data itself)."""
    from arfuse.adapters import load_model

    if len(cfg.smalls) != 1:
        raise ArfuseError(f"the cosine rule fuses one large and one small model, {1 + len(cfg.smalls)} given")
    if power is not None:
        power = check_power(power)
    if embeddings not in ("large", "small"):
        raise ArfuseError(f"embeddings {embeddings!r}: use 'large' or 'small' (whose token embeddings give the similarity)")
    report = evaluate(cfg, progress=progress)  # linear rule, cached scoring, both models checked alike
    llm, slm = (load_model(s, device=cfg.device, dtype=cfg.dtype) for s in (cfg.large, cfg.smalls[0]))
    unit = unit_rows((llm if embeddings == "large" else slm).input_embeddings())
    data = load_dataset(cfg.data)
    valid = load_dataset(cfg.valid) if cfg.valid else None

    def records(ds):
        return [score(m, ds, cfg.score, batch_size=cfg.batch_size, use_cache=cfg.use_cache, progress=False)
                for m in (llm, slm)]

    if power is None:
        fit = valid or data
        rl, rs = records(fit)
        need = len(rl.target) * unit.shape[0] * 4
        if need > MAX_VALID_BYTES:
            raise ArfuseError(f"searching the power keeps the LLM's full distributions of {fit.name} in memory: "
                              f"{len(rl.target):,} tokens x {unit.shape[0]:,} = {need / 2 ** 30:.1f} GiB; give a "
                              "shorter --valid slice (e.g. [:20000] characters) or a --power")
        full = torch.empty(len(rl.target), unit.shape[0])  # filled window by window: one N x V copy
        seen = [0]

        def keep(lp, tgt):
            i = seen[0]
            _check_targets(tgt, rl.target, i, llm.info.name)
            full[i:i + len(tgt)] = lp
            seen[0] += len(tgt)

        full_logprob_pass(llm, fit, cfg.score, keep, progress=progress)
        _check_complete(seen[0], len(rl.target), llm.info.name)
        power, _ = optimal_power(full, torch.as_tensor(rs.topk_ids[:, 0]).long(), torch.as_tensor(rl.target).long(),
                                 unit)
        del full
        source = (f"exact NLL-optimal power on the validation data, {fit.name}" if valid
                  else f"NLL-optimal on the test data itself ({fit.name}): no --valid given, so the gain is optimistic")
    else:
        source = "given (--power)"
    rl, rs = records(data)
    anchor = torch.as_tensor(rs.topk_ids[:, 0]).long()
    out = np.empty(len(rl.target), np.float64)
    at = [0]

    def fuse(lp, tgt):
        i = at[0]
        _check_targets(tgt, rl.target, i, llm.info.name)
        for a in range(0, len(tgt), ROWS):  # a few rows at a time: the temporaries are rows x V float64
            b = min(len(tgt), a + ROWS)
            out[i + a:i + b] = cosine_target_logprobs(lp[a:b], anchor[i + a:i + b], tgt[a:b], unit,
                                                      [power])[:, 0].double().numpy()
        at[0] += len(tgt)

    full_logprob_pass(llm, data, cfg.score, fuse, progress=progress)
    _check_complete(at[0], len(rl.target), llm.info.name)
    base = report.rows[0].metrics["token_ppl"]
    m = perplexity_metrics(out, rl.nbytes, rl.nchars, rl.nwords)
    report.rows.append(Row(f"AR cosine (p = {power:.4g})", "cosine", m, 100.0 * (1.0 - m["token_ppl"] / base)))
    ci = bootstrap_ppl_gain(rl.logp.astype(np.float64), out, block=cfg.score.window)
    report.cosine = {"power": power, "power_source": source, "embeddings": embeddings, "gain_ci": ci}
    return report
