"""The few-row linear kernels each model owns (arfuse.adapters.kernels) and generation switches on:
same products as F.linear, scoped, switchable, measured and searched once per model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arfuse.adapters import kernels, load_model
from arfuse.generation.api import generate


@pytest.mark.parametrize("pad_one", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [7, 9000])  # an ordinary and a wide (vocabulary-like) layer
def test_small_row_products_equal_f_linear(bias, out_features, pad_one):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, out_features, bias=bias)
    k = kernels.FewRowKernels(torch.nn.Sequential(lin), pad_one=pad_one)  # as if measured: one row alone, or padded
    for rows in range(1, 11):
        for shape in ((rows, 48), (1, rows, 48)):
            x = torch.randn(*shape)
            want = F.linear(x, lin.weight, lin.bias)
            with k.active() as n:
                assert n == 1
                got = lin(x)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a column-major input (as a transposed product would hand on) gives the same numbers
    xt = torch.randn(48, 3).t()
    with k.active():
        torch.testing.assert_close(lin(xt), F.linear(xt, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_one_row_padding_is_measured_once_per_model(monkeypatch):
    calls = []

    def measure(weights, sweeps=3):
        calls.append([tuple(w.shape) for w in weights])
        return True

    monkeypatch.setattr(kernels, "_measure_one_row", measure)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4).double())
    k = kernels.FewRowKernels(net)
    for _ in range(2):
        k.refresh()
        with k.active():
            x = torch.randn(1, 8)
            torch.testing.assert_close(net[1](net[0](x)), F.linear(F.linear(x, net[0].weight, net[0].bias),
                                                                   net[1].weight, net[1].bias), rtol=1e-5, atol=1e-5)
    assert calls == [[(16, 8), (4, 16)]]  # once, over the switched float32 layers in order
    assert k.pad_one is True and set(k.forwards) == {net[0], net[1]}
    assert kernels.FewRowKernels(torch.nn.Sequential(torch.nn.Linear(4, 4).double())).pad_one is None  # nothing to pad
    # the real measurement: a plain answer, and none for layers it cannot switch
    monkeypatch.undo()
    assert kernels._measure_one_row([torch.randn(64, 32)], sweeps=1) in (True, False)
    assert kernels._measure_one_row([torch.randn(4, 4).double()]) is False


def test_each_model_owns_its_kernels(tiny_models):
    """``CausalLM.fast_kernels()`` is the model's own object, made once; its layers are the model's."""
    llm = load_model(tiny_models["large"])
    k = llm.fast_kernels()
    assert llm.fast_kernels() is k and k.pad_one in (True, False)
    assert set(k.forwards) == {m for m in llm.network().modules() if type(m) is torch.nn.Linear}


def test_switched_only_inside_and_only_float32_cpu():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.float64)
    net = torch.nn.Sequential(a, b)
    k = kernels.FewRowKernels(net, pad_one=False)
    with k.active() as n:
        assert n == 1 and "forward" in a.__dict__ and "forward" not in b.__dict__
        with kernels.FewRowKernels(net, pad_one=False).active() as inner:  # nested: nothing switched twice
            assert inner == 0
        assert "forward" in a.__dict__  # the inner exit left the outer switch alone
    assert "forward" not in a.__dict__
    with kernels.FewRowKernels(None).active() as n:  # a model without a torch module: nothing to switch
        assert n == 0 and "forward" not in a.__dict__
    with pytest.raises(RuntimeError), k.active():
        raise RuntimeError("restored on errors too")
    assert "forward" not in a.__dict__


def test_generation_uses_them_and_restores(tiny_models):
    torch.set_num_threads(1)
    llm, slm = load_model(tiny_models["large"]), load_model(tiny_models["small"])
    seen = []
    real = kernels._product

    def spy(x, weight, bias, pad_one=False):
        seen.append(x.numel() // weight.shape[1])
        return real(x, weight, bias, pad_one)

    kernels._product = spy
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
        kernels._product = real


def _repeating(n_out: int, distinct: int, bias: bool, n_in: int = 24) -> torch.nn.Linear:
    """A wide layer whose rows are copies of ``distinct`` rows (as a compact-vocabulary export has)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    src = torch.randint(0, distinct, (n_out,), generator=torch.Generator().manual_seed(2))
    src[:distinct] = torch.arange(distinct)
    with torch.no_grad():
        lin.weight.copy_(lin.weight[src].clone())
        if bias:
            lin.bias.copy_(lin.bias[src].clone())
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_repeated_rows_are_computed_once_with_the_same_logits(bias):
    lin = _repeating(9000, 700, bias)
    rows = kernels.shared_rows(lin)
    assert rows is not None and rows.distinct == 700
    assert torch.equal(rows.weight[rows.index], lin.weight)
    if bias:
        assert torch.equal(rows.bias[rows.index], lin.bias)
    k = kernels.FewRowKernels(torch.nn.Sequential(lin))
    assert k.shared_rows(lin) is k.shared_rows(lin)  # searched once per weight
    for n in range(1, 11):
        for shape in ((n, 24), (1, n, 24), (2, n, 24)):
            x = torch.randn(*shape)
            with k.active() as switched:
                assert switched == 1
                got = lin(x)
            torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
            assert got.shape == (*shape[:-1], 9000)
    # a float64 layer is not switched for few-row products, but its repeated rows still count once
    lin64 = _repeating(9000, 700, bias).to(torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64)
    with kernels.FewRowKernels(torch.nn.Sequential(lin64)).active() as switched:
        assert switched == 1
        torch.testing.assert_close(lin64(x), F.linear(x, lin64.weight, lin64.bias))


def test_repeated_rows_only_when_worth_it_and_found_again_after_an_edit():
    assert kernels.shared_rows(torch.nn.Linear(24, 9000)) is None            # all distinct
    assert kernels.shared_rows(_repeating(9000, 7200, False)) is None        # 20% repeat: below SHARED_MIN
    assert kernels.shared_rows(_repeating(100, 10, False)) is None           # narrow: never searched
    lin = _repeating(9000, 6000, False)                                      # a third repeat
    k = kernels.FewRowKernels(torch.nn.Sequential(lin))
    assert k.shared_rows(lin).distinct == 6000
    with torch.no_grad():
        lin.weight[6000] += 1.0  # a copy of row src[6000] now differs from it
    assert k.shared_rows(lin).distinct == 6001  # the kept answer is dropped when the weight changes
    k.refresh()
    with k.active():
        x = torch.randn(2, 24)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
