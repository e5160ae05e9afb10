"""Matrix products for decoding a few tokens at a time on a CPU, owned by the model they speed up.

A speculative verify pass feeds the LLM g + 1 tokens, so every linear layer multiplies a
(g + 1) x d input by its weight. With float32 weights on a CPU, ``F.linear`` on 2 to 5 rows can
cost far more than its one-row time (MKL's small-M GEMM path), so a pass over a few tokens costs
much more than a step and speculation cannot pay. The same product written as ``W @ x.T`` stays near the
one-row cost up to a few rows (up to 5 rows for ordinary layers, 8 for a vocabulary head; past that
MKL's GEMM is as fast or faster). benchmarks/bench_generate.py measures the pass cost both ways.

``FewRowKernels`` swaps that product in, for float32 CPU linears only and only while its
``active()`` context is entered (the ``forward`` attribute of each ``nn.Linear`` instance, restored
on exit). Results are the same products summed in another order (float32 rounding). Each model
holds one (``CausalLM.fast_kernels``), with what it measured and found about its layers.

One row. On some CPUs a two-row product beats the one-row ``F.linear`` of a layer whose weights
stream from memory (a zero row computed beside the real one), while on others, and for a small
model whose weights stay in cache, it costs more. So each model's one-row path is measured once
(``_measure_one_row``: one row through all its layers in order, as a step streams them, against the
padded product, best of three sweeps each) and padded only where that is 5% faster.

Output layers with repeated rows. A model trained with a compact vocabulary (``arfuse train``,
``compact_vocab``) is exported with one shared row for every token its text never held (the KJV
SLM's 49,152 x 256 head has 10,446 distinct rows). Such a layer (a quarter or more of its rows
repeating others, found once per weight) multiplies its distinct rows only and copies each result
to the rows that share it: the same logits for a fraction of the work, so that the SLM no longer
costs a fused step more than its layers do.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

# most rows that take W @ x.T: wide output layers (a vocabulary head) gain up to 8 rows,
# ordinary layers up to 5 (past that MKL's GEMM is as fast or faster)
MAX_ROWS = 5
MAX_ROWS_WIDE = 8
WIDE = 8192
PAD_TO = {3: 4}
# a wide layer computes only its distinct rows when at least this share of its rows repeat others
SHARED_MIN = 0.25
PROBE_COLUMNS = 8   # rows that differ in their first columns differ: a cheap bound before the full search
ONE_ROW_GAIN = 0.95   # pad one row to two where the padded sweep takes at most this share of the one-row sweep's time


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_one: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``W @ x.T`` for a few float32 CPU rows."""
    out_f, in_f = weight.shape
    rows = x.numel() // in_f if in_f else 0
    limit = MAX_ROWS_WIDE if out_f >= WIDE else MAX_ROWS
    if rows < (1 if pad_one else 2) or rows > limit or x.dtype != torch.float32 or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    # both copies are a few rows: a contiguous x keeps MKL on its fast transposed-B path (a
    # column-major x, as a transposed output would pass on to the next layer, is 3x slower)
    x2 = x.reshape(rows, in_f).contiguous()
    pad = 2 if rows == 1 else PAD_TO.get(rows, rows)
    if pad > rows:  # MKL's 4-row kernel beats its 3-row one (and, where measured, 2 rows beat 1): compute zero rows too
        x2 = torch.cat([x2, x2.new_zeros(pad - rows, in_f)])
    y = torch.mm(weight, x2.t())[:, :rows].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_f)


class SharedRows:
    """A layer's distinct rows (weight and bias together) and, for each of its rows, which one it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor):
        self.weight, self.bias, self.index = weight, bias, index

    @property
    def distinct(self) -> int:
        return int(self.weight.shape[0])


@torch.no_grad()
def shared_rows(lin: torch.nn.Linear) -> SharedRows | None:
    """The distinct rows of a wide layer (``WIDE`` outputs or more) of which a quarter or more repeat
    (``SHARED_MIN``), else None. Searches every call (a sort of the whole weight;
    ``FewRowKernels.shared_rows`` keeps the answer until the weight changes)."""
    if lin.out_features < WIDE:
        return None
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    full = w if b is None else torch.cat([w, b[:, None].to(w.dtype)], 1)
    most = int(full.shape[0] * (1 - SHARED_MIN))
    if torch.unique(full[:, :PROBE_COLUMNS], dim=0).shape[0] > most:  # a cheap bound first
        return None
    distinct, index = torch.unique(full, dim=0, return_inverse=True)
    if distinct.shape[0] > most:
        return None
    n_in = w.shape[1]
    bias = None if b is None else distinct[:, n_in].to(b.dtype).contiguous()
    return SharedRows(distinct[:, :n_in].contiguous(), bias, index.to(w.device))


@torch.no_grad()
def _measure_one_row(weights: Sequence[torch.Tensor], sweeps: int = 3) -> bool:
    """Whether one row through every weight in order (as a decoding step streams them from memory, or
    from cache for a small model) runs faster padded to two rows than with ``F.linear``; best of
    ``sweeps`` interleaved sweeps each (a few steps' worth of time, once per model)."""
    ws = [w for w in weights if w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2]
    if not ws:
        return False
    ones = {n: torch.randn(1, n) for n in {w.shape[1] for w in ws}}
    twos = {n: torch.cat([x, x.new_zeros(1, n)]) for n, x in ones.items()}
    best = {False: math.inf, True: math.inf}
    for _ in range(sweeps):
        for pad in (False, True):
            t0 = time.perf_counter()
            for w in ws:
                if pad:
                    torch.mm(w, twos[w.shape[1]].t())
                else:
                    F.linear(ones[w.shape[1]], w)
            best[pad] = min(best[pad], time.perf_counter() - t0)
    return best[True] <= ONE_ROW_GAIN * best[False]


class FewRowKernels:
    """The few-row products of one model's ``nn.Linear`` layers, and what was measured and found
    about them: whether its one-row products pad to two (``pad_one``, measured on first use unless
    given) and which wide layers have repeated rows. ``active()`` switches them in for a while."""

    def __init__(self, module: torch.nn.Module | None, pad_one: bool | None = None):
        self.module = module
        self.pad_one = pad_one
        self.forwards: dict[torch.nn.Linear, object] = {}   # layer -> the forward it runs while active
        self._shared: dict[torch.nn.Linear, tuple[tuple, SharedRows | None]] = {}
        self.refresh()

    def linears(self) -> list[torch.nn.Linear]:
        """The model's plain ``nn.Linear`` layers, in module order."""
        if not isinstance(self.module, torch.nn.Module):
            return []
        return [m for m in self.module.modules() if type(m) is torch.nn.Linear]

    def shared_rows(self, lin: torch.nn.Linear) -> SharedRows | None:
        """``shared_rows(lin)``, searched once per weight: kept until the weight (or bias) changes."""
        w, b = lin.weight, lin.bias
        key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        hit = self._shared.get(lin)
        if hit is None or hit[0] != key:
            hit = self._shared[lin] = (key, shared_rows(lin))
        return hit[1]

    def refresh(self) -> None:
        """Find the layers to switch and the product each runs (again: weights may have changed since)."""
        self.forwards = {}
        weights = []
        for lin in self.linears():
            rows = self.shared_rows(lin)
            if rows is not None:
                self.forwards[lin] = self._shared_forward(rows)
                weights.append(rows.weight)
            elif lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32:
                self.forwards[lin] = self._forward(lin)
                weights.append(lin.weight)
        if self.pad_one is None and weights:
            self.pad_one = _measure_one_row(weights)

    def _forward(self, lin: torch.nn.Linear):
        return lambda x: _product(x, lin.weight, lin.bias, bool(self.pad_one))

    def _shared_forward(self, rows: SharedRows):
        def forward(x: torch.Tensor) -> torch.Tensor:
            y = _product(x, rows.weight, rows.bias, bool(self.pad_one))  # (..., distinct)
            # a 2-D index_select: several times faster than one along the last dim of a 3-D tensor
            return y.reshape(-1, y.shape[-1]).index_select(1, rows.index).reshape(*y.shape[:-1], rows.index.numel())
        return forward

    @contextlib.contextmanager
    def active(self) -> Iterator[int]:
        """While inside, the switched layers run their few-row products. Yields how many layers were
        switched; layers already switched (nested use) are left alone. Entering and leaving costs a
        dictionary write per layer, so generation switches around every cycle's model calls and a
        paused stream leaves the model untouched."""
        patched = []
        for lin, fwd in self.forwards.items():
            d = lin.__dict__
            if "forward" not in d:
                d["forward"] = fwd
                patched.append(d)
        try:
            yield len(patched)
        finally:
            for d in patched:
                d.pop("forward", None)
