"""Matrix products for decoding a few tokens at a time on a CPU.

A speculative verify pass feeds the LLM g + 1 tokens, so every linear layer multiplies a
(g + 1) x d input by its weight. With float32 weights on a CPU, ``F.linear`` on 2 to 5 rows costs
1.4x to 2.2x its one-row time (MKL's small-M GEMM path), so a pass over three tokens cost twice a
step and speculation could not pay. The same product written as ``W @ x.T`` stays near the
one-row cost up to a few rows: measured on this project's 2-core AMD EPYC (1 thread, SmolLM2-135M's
30 layers of weights, benchmarks/bench_generate.py prints the real pass cost):

    rows                          1     2     4     8
    layers, F.linear (ms)       37.3  52.9  56.7  66.6
    layers, W @ x.T (ms)        37.4  41.1  42.1  70.0
    49,152 x 576 head, F.linear  9.5  20.9  22.3  25.1
    49,152 x 576 head, W @ x.T   9.1  10.0  10.5  17.4

``small_row_linears`` swaps that product in, for float32 CPU linears only and only while
generation runs (the ``forward`` attribute of each ``nn.Linear`` instance, restored on exit).
Results are the same products summed in another order (float32 rounding).

One row. On some CPUs a two-row product beats the one-row ``F.linear`` of a layer whose weights
stream from memory: on this project's later 2-core AMD EPYC (Zen 5, 32 MiB L3) a whole SmolLM2 step
took 37.9 ms with ``F.linear`` and 35.5 ms computing a zero row beside the real one, while the KJV
SLM, whose weights stay in cache, gained nothing (1.06 vs 1.09 ms); on the machine of the table
above two rows cost 10% more than one. So each model's one-row path is measured once per process
(``pads_one_row``: one row through all its layers in order, as a step streams them, against the
padded product, best of three sweeps each) and padded only where that is 5% faster.

Output layers with repeated rows. A model trained with a compact vocabulary (``arfuse train``,
``compact_vocab``) is exported with one shared row for every token its text never held: the KJV
SLM's 49,152 x 256 head has 10,446 distinct rows. Such a layer (a quarter or more of its rows
repeating others, found once per weight) multiplies its distinct rows only and copies each result
to the rows that share it: the same logits, 0.40 instead of 7.7 ms per step on the KJV SLM (one
thread), so that the SLM no longer costs a fused step more than its layers do.
"""
from __future__ import annotations

import contextlib
import math
import time
import types
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

# most rows that take W @ x.T: wide output layers (a vocabulary head) gain up to 8 rows,
# ordinary layers up to 5 (measured above; past that MKL's GEMM is as fast or faster)
MAX_ROWS = 5
MAX_ROWS_WIDE = 8
WIDE = 8192
PAD_TO = {3: 4}
# a wide layer computes only its distinct rows when at least this share of its rows repeat others
SHARED_MIN = 0.25
PROBE_COLUMNS = 8   # rows that differ in their first columns differ: a cheap bound before the full search


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad_one: bool = False) -> torch.Tensor:
    out_f, in_f = weight.shape
    rows = x.numel() // in_f if in_f else 0
    limit = MAX_ROWS_WIDE if out_f >= WIDE else MAX_ROWS
    if rows < (1 if pad_one else 2) or rows > limit or x.dtype != torch.float32 or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    # both copies are a few rows: a contiguous x keeps MKL on its fast transposed-B path (a
    # column-major x, as a transposed output would pass on to the next layer, is 3x slower)
    x2 = x.reshape(rows, in_f).contiguous()
    pad = 2 if rows == 1 else PAD_TO.get(rows, rows)
    if pad > rows:  # MKL's 4-row kernel beats its 3-row one (and, measured, 2 rows beat 1): compute zero rows too
        x2 = torch.cat([x2, x2.new_zeros(pad - rows, in_f)])
    y = torch.mm(weight, x2.t())[:, :rows].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_f)


_PAD_ONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # layer -> one row runs as two (measured)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _product(x, self.weight, self.bias, _PAD_ONE.get(self, False))


def _shared_forward(self: torch.nn.Linear, x: torch.Tensor, rows: SharedRows) -> torch.Tensor:
    y = _product(x, rows.weight, rows.bias, _PAD_ONE.get(self, False))  # (..., distinct)
    # a 2-D index_select: on a (1, 1, 10,446) -> 49,152 copy 25 us, against 100 us along the last dim of 3-D
    return y.reshape(-1, y.shape[-1]).index_select(1, rows.index).reshape(*y.shape[:-1], rows.index.numel())


class SharedRows:
    """A layer's distinct rows (weight and bias together) and, for each of its rows, which one it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor):
        self.weight, self.bias, self.index = weight, bias, index

    @property
    def distinct(self) -> int:
        return int(self.weight.shape[0])


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # layer -> (weight identity, SharedRows | None)


def shared_rows(lin: torch.nn.Linear) -> SharedRows | None:
    """The distinct rows of a wide layer (``WIDE`` outputs or more) of which a quarter or more repeat
    (``SHARED_MIN``), else None. Searched once per weight: the result is kept until the weight changes."""
    if lin.out_features < WIDE:
        return None
    w, b = lin.weight, lin.bias
    key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
    hit = _SHARED.get(lin)
    if hit is not None and hit[0] == key:
        return hit[1]
    found = _find_shared(w.detach(), None if b is None else b.detach())
    _SHARED[lin] = (key, found)
    return found


@torch.no_grad()
def _find_shared(w: torch.Tensor, b: torch.Tensor | None) -> SharedRows | None:
    full = w if b is None else torch.cat([w, b[:, None].to(w.dtype)], 1)
    most = int(full.shape[0] * (1 - SHARED_MIN))
    if torch.unique(full[:, :PROBE_COLUMNS], dim=0).shape[0] > most:  # ~10 ms on a 49,152-row head
        return None
    distinct, index = torch.unique(full, dim=0, return_inverse=True)  # ~0.3 s, once per weight
    if distinct.shape[0] > most:
        return None
    n_in = w.shape[1]
    return SharedRows(distinct[:, :n_in].contiguous(), None if b is None else distinct[:, n_in].to(b.dtype).contiguous(),
                      index.to(w.device))


_ONE_ROW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model module -> pad one row to two
ONE_ROW_GAIN = 0.95   # pad where the padded sweep takes at most this share of the one-row sweep's time


def pads_one_row(module: torch.nn.Module, weights: Sequence[torch.Tensor]) -> bool:
    """Whether ``module``'s one-row products run faster as two-row ones (a zero row computed and
    dropped): measured once per module and process (``_measure_one_row``) and kept."""
    hit = _ONE_ROW.get(module)
    if hit is None:
        hit = _ONE_ROW[module] = _measure_one_row(weights)
    return hit


@torch.no_grad()
def _measure_one_row(weights: Sequence[torch.Tensor], sweeps: int = 3) -> bool:
    """One row through every weight in order (as a decoding step streams them from memory, or from
    cache for a small model) with ``F.linear``, against the padded two-row product; best of
    ``sweeps`` interleaved sweeps each (about 6 steps' worth of time for SmolLM2-135M, once)."""
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


def _linears(model) -> list[torch.nn.Linear]:
    module = getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return []
    return [m for m in module.modules() if type(m) is torch.nn.Linear]


def _switch(lin: torch.nn.Linear):
    """The forward that replaces ``lin``'s while generating, or None to keep its own."""
    rows = shared_rows(lin)
    if rows is not None:
        return types.MethodType(lambda self, x: _shared_forward(self, x, rows), lin)
    if lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32:
        return types.MethodType(_forward, lin)
    return None


class SmallRowLinears:
    """The switchable layers of ``models``, found once; ``active()`` switches them for a while.

    Entering and leaving costs a dictionary write per layer (generation switches around every
    cycle's model calls, so that a paused stream leaves the models untouched)."""

    def __init__(self, models: Sequence, enabled: bool = True):
        self.pairs = []
        for model in models if enabled else []:
            pairs = [(lin, _switch(lin)) for lin in _linears(model)]
            pairs = [(lin, fwd) for lin, fwd in pairs if fwd is not None]
            if pairs:  # the product each layer runs: its distinct rows where they repeat
                pad = pads_one_row(model.model, [(shared_rows(lin) or lin).weight for lin, _ in pairs])
                for lin, _ in pairs:
                    _PAD_ONE[lin] = pad
            self.pairs += pairs
        self.shared = {lin: shared_rows(lin) for lin, _ in self.pairs if shared_rows(lin) is not None}

    @contextlib.contextmanager
    def active(self) -> Iterator[int]:
        """Yields how many layers were switched. Layers already switched (nested use) are left alone."""
        patched = []
        for lin, fwd in self.pairs:
            d = lin.__dict__
            if "forward" not in d:
                d["forward"] = fwd
                patched.append(d)
        try:
            yield len(patched)
        finally:
            for d in patched:
                d.pop("forward", None)


def small_row_linears(models: Sequence, enabled: bool = True):
    """While inside, the float32 CPU ``nn.Linear`` layers of ``models`` multiply 2 to 8 rows as W @ x.T
    (one row too, padded to two, in models where that measured faster), and wide layers with
    repeated rows compute their distinct rows only.

    Yields how many layers were switched. Layers already switched (nested use) are left alone.
    """
    return SmallRowLinears(models, enabled).active()
