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
generation runs (the ``forward`` attribute of each ``nn.Linear`` instance, restored on exit); one
row keeps ``F.linear``, so plain decoding at batch 1 runs the stock kernel. Results are the same
products summed in another order (float32 rounding).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

# most rows that take W @ x.T: wide output layers (a vocabulary head) gain up to 8 rows,
# ordinary layers up to 5 (measured above; past that MKL's GEMM is as fast or faster)
MAX_ROWS = 5
MAX_ROWS_WIDE = 8
WIDE = 8192
PAD_TO = {3: 4}


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features if self.in_features else 0
    limit = MAX_ROWS_WIDE if self.out_features >= WIDE else MAX_ROWS
    if rows < 2 or rows > limit or x.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    # both copies are a few rows: a contiguous x keeps MKL on its fast transposed-B path (a
    # column-major x, as a transposed output would pass on to the next layer, is 3x slower)
    x2 = x.reshape(rows, self.in_features).contiguous()
    if rows in PAD_TO:  # MKL's 4-row kernel beats its 3-row one: compute a zero row too, drop it
        x2 = torch.cat([x2, x2.new_zeros(PAD_TO[rows] - rows, self.in_features)])
    y = torch.mm(self.weight, x2.t())[:, :rows].t().contiguous()
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], self.out_features)


def _linears(model) -> list[torch.nn.Linear]:
    module = getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        return []
    return [m for m in module.modules() if type(m) is torch.nn.Linear
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


class SmallRowLinears:
    """The switchable layers of ``models``, found once; ``active()`` switches them for a while.

    Entering and leaving costs a dictionary write per layer (generation switches around every
    cycle's model calls, so that a paused stream leaves the models untouched)."""

    def __init__(self, models: Sequence, enabled: bool = True):
        self.pairs = [(lin, types.MethodType(_forward, lin)) for model in models for lin in _linears(model)] \
            if enabled else []

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
    """While inside, the float32 CPU ``nn.Linear`` layers of ``models`` multiply 2 to 8 rows as W @ x.T.

    Yields how many layers were switched. Layers already switched (nested use) are left alone.
    """
    return SmallRowLinears(models, enabled).active()
