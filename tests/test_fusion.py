import math

import numpy as np
import pytest
import torch

from arfuse.errors import ArfuseError
from arfuse.fusion import k_to_w, linear, logprob_average, uniform, w_to_k


def _dists(seed, shape=(3, 7, 50)):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


def test_linear_is_the_probability_mixture():
    a, b = _dists(0), _dists(1)
    out = linear([a, b], [0.8, 0.2])
    np.testing.assert_allclose(out.exp().numpy(), (0.8 * a.exp() + 0.2 * b.exp()).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_fused_distributions_sum_to_one(w):
    a, b = _dists(2), _dists(3)
    s = linear([a, b], [w, 1 - w]).exp().sum(-1)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    s3 = linear([a, b, _dists(4)], [w / 2, w / 2, 1 - w]).exp().sum(-1)
    torch.testing.assert_close(s3, torch.ones_like(s3), atol=1e-5, rtol=0)
    lavg = logprob_average([a, b], [w, 1 - w]).exp().sum(-1)
    torch.testing.assert_close(lavg, torch.ones_like(lavg), atol=1e-5, rtol=0)


def test_weight_one_reproduces_the_model_bit_for_bit():
    a, b = _dists(5), _dists(6)
    assert torch.equal(linear([a, b], [1.0, 0.0]), a)
    assert torch.equal(linear([a, b], [0.0, 1.0]), b)
    an = a.numpy()
    assert np.array_equal(linear([an, b.numpy()], [1.0, 0.0]), an)


def test_inputs_never_modified():
    a, b = _dists(7), _dists(8)
    a0, b0 = a.clone(), b.clone()
    for fn in (lambda: linear([a, b], [0.7, 0.3]), lambda: uniform([a, b]), lambda: logprob_average([a, b]),
               lambda: linear([a, b], [1.0, 0.0])):
        out = fn()
        out.add_(1.0)  # mutating the result must not reach the inputs
        assert torch.equal(a, a0) and torch.equal(b, b0)


def test_numpy_and_torch_agree_and_no_underflow():
    a = np.array([-1000.0, -2.0, -0.1])
    b = np.array([-1.0, -3000.0, -0.2])
    out = linear([a, b], [0.9, 0.1])
    np.testing.assert_allclose(out, [math.log(0.1) - 1.0, math.log(0.9) - 2.0, np.log(0.9 * np.exp(-0.1) + 0.1 * np.exp(-0.2))])
    np.testing.assert_allclose(linear([torch.tensor(a), torch.tensor(b)], [0.9, 0.1]).numpy(), out)


@pytest.mark.parametrize("weights,msg", [([1.2, -0.2], "outside [0, 1]"), ([0.5, 0.6], "sum to"), ([0.5], "2 models"),
                                         ([float("nan"), 0.5], "outside")])
def test_bad_weights(weights, msg):
    with pytest.raises(ArfuseError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        linear([np.zeros(3), np.zeros(3)], weights)


def test_k_and_w():
    assert w_to_k(0.95) == pytest.approx(19.0)
    assert k_to_w(19.0) == pytest.approx(0.95)
    assert w_to_k(1.0) == math.inf and k_to_w(math.inf) == 1.0


def test_logprob_average_leaves_out_a_model_of_weight_zero():
    a, b = _dists(9), _dists(10)
    a[..., 0] = -math.inf  # a token the first model rules out: 0 * -inf must not reach the sum
    out = logprob_average([a, b], [0.0, 1.0])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, b)
    assert torch.isinf(logprob_average([a, b], [0.5, 0.5])[..., 0]).all()
