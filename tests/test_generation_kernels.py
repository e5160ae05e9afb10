"""The few-row linear kernels used while generating: same products as F.linear, scoped, switchable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arfuse.adapters import load_model
from arfuse.generation import kernels
from arfuse.generation.api import generate


class _Holder:
    """What the kernels look for: a ``model`` attribute holding a torch module."""

    def __init__(self, module):
        self.model = module


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [7, 9000])  # an ordinary and a wide (vocabulary-like) layer
def test_small_row_products_equal_f_linear(bias, out_features):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, out_features, bias=bias)
    net = torch.nn.Sequential(lin)
    for rows in range(1, 11):
        for shape in ((rows, 48), (1, rows, 48)):
            x = torch.randn(*shape)
            want = F.linear(x, lin.weight, lin.bias)
            with kernels.small_row_linears([_Holder(net)]) as n:
                assert n == 1
                got = lin(x)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a column-major input (as a transposed product would hand on) gives the same numbers
    xt = torch.randn(48, 3).t()
    with kernels.small_row_linears([_Holder(net)]):
        torch.testing.assert_close(lin(xt), F.linear(xt, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_switched_only_inside_and_only_float32_cpu():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.float64)
    net = torch.nn.Sequential(a, b)
    with kernels.small_row_linears([_Holder(net)]) as n:
        assert n == 1 and "forward" in a.__dict__ and "forward" not in b.__dict__
        with kernels.small_row_linears([_Holder(net)]) as inner:  # nested: nothing switched twice
            assert inner == 0
        assert "forward" in a.__dict__  # the inner exit left the outer switch alone
    assert "forward" not in a.__dict__
    with kernels.small_row_linears([_Holder(net)], enabled=False) as n:
        assert n == 0 and "forward" not in a.__dict__
    with pytest.raises(RuntimeError), kernels.small_row_linears([_Holder(net)]):
        raise RuntimeError("restored on errors too")
    assert "forward" not in a.__dict__


def test_generation_uses_them_and_restores(tiny_models):
    torch.set_num_threads(1)
    llm, slm = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    seen = []
    real = kernels._forward

    def spy(self, x):
        seen.append(x.numel() // self.in_features)
        return real(self, x)

    kernels._forward = spy
    try:
        stream = generate("The quick brown", large=llm, small=slm, weight=0.7, max_new_tokens=6, speculative=3,
                          stream=True)
        next(iter(stream))
        mods = [m for m in llm.model.modules() if type(m) is torch.nn.Linear]
        assert mods and all("forward" not in m.__dict__ for m in mods)  # a paused stream leaves the models alone
        for _ in stream:
            pass
        assert all("forward" not in m.__dict__ for m in mods)
        assert 4 in seen  # the verify passes (1 + 3 tokens) went through the kernels
        off = generate("The quick brown", large=llm, small=slm, weight=0.7, max_new_tokens=6, speculative=3,
                       fast_kernels=False)
        on = generate("The quick brown", large=llm, small=slm, weight=0.7, max_new_tokens=6, speculative=3)
        assert off.token_ids == on.token_ids
    finally:
        kernels._forward = real
