"""The hand-written double-backward layers (ltdd.models.double_backward) against stock PyTorch.

The trajectory-matching engine swaps these into its student by default, so every derivative the engine takes through
them (the gradient w.r.t. the weights with ``create_graph=True``, then the gradient of a function of that gradient
w.r.t. images, weights and a step size) must equal the stock modules' up to float rounding, including the cases where
the kernels skip terms that the running backward pass does not need.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltdd.models import create_model
from ltdd.models.double_backward import (DoubleBackwardAvgPool2d, DoubleBackwardConv2d, DoubleBackwardInstanceNorm2d,
                                         DoubleBackwardInstanceNorm2dBasic, DoubleBackwardReLU,
                                         use_double_backward_kernels)
from ltdd.models.layers import InstanceNorm2dBasic


def _layers():
    torch.manual_seed(0)
    return {
        "conv_image": (nn.Conv2d(3, 5, 3, padding=1), (4, 3, 8, 8)),  # <= 4 input channels: matmul + fold path
        "conv_wide": (nn.Conv2d(6, 5, 3, padding=1), (4, 6, 8, 8)),
        "conv_stride": (nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), (3, 3, 9, 9)),
        "groupnorm_in": (nn.GroupNorm(5, 5, affine=True), (4, 5, 6, 6)),
        "basic_in": (InstanceNorm2dBasic(5), (4, 5, 6, 6)),
        "relu": (nn.ReLU(), (4, 5, 6, 6)),
        "avgpool2x2": (nn.AvgPool2d(2, 2), (4, 5, 6, 6)),
        "avgpool3": (nn.AvgPool2d(3, 1, 1), (2, 3, 5, 5)),
    }


LAYERS = list(_layers())


def _affine(m: nn.Module) -> None:
    """Give norm layers non-trivial affine parameters, so their terms are tested too."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _second_order(m: nn.Module, x: torch.Tensor, need_params: bool):
    """One unrolled SGD step on ``m``'s parameters followed by a loss on the new parameters and the input:
    returns the second-order gradients w.r.t. the input, a step size and (if asked) the parameters."""
    params = list(m.parameters())
    x = x.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=x.dtype, requires_grad=True)
    y = m(x)
    target = torch.linspace(-1, 1, y.numel(), dtype=x.dtype).reshape(y.shape)
    loss = (y.tanh() * target).sum()
    inputs = [x, lr] + (params if need_params else [])
    if not params:  # a layer without weights: differentiate the input gradient itself
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        out = (gx * torch.cos(torch.arange(gx.numel(), dtype=x.dtype).reshape(gx.shape))).sum() * lr
        return torch.autograd.grad(out, inputs)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    new = [p - lr * g for p, g in zip(params, grads)]
    match = sum(((q - p.detach() - 0.01) ** 2).sum() for p, q in zip(params, new))
    # also a first-order dependence on x through the forward, as in a student's next step
    match = match + (m(x) ** 2).mean() * 0.0 + (y * 0.01).sum()
    return torch.autograd.grad(match, inputs, allow_unused=True)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("need_params", [True, False], ids=["with-param-grads", "input-and-lr-only"])
def test_second_derivatives_match_stock(name, need_params):
    stock, shape = _layers()[name]
    _affine(stock)
    stock = stock.double()
    fast = copy.deepcopy(stock)
    assert use_double_backward_kernels(fast) == 1
    assert type(fast) is not type(stock)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), stock(x))
    ref = _second_order(stock, x, need_params)
    got = _second_order(fast, x, need_params)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        if r is None:
            assert g is None or g.abs().max() == 0
            continue
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    assert ref[0].abs().sum() > 0  # the input gradient is not trivially zero


@pytest.mark.parametrize("name", ["conv_image", "conv_wide", "groupnorm_in", "basic_in"])
def test_gradcheck_first_and_second_order(name):
    m, shape = _layers()[name]
    _affine(m)
    m = m.double()
    use_double_backward_kernels(m)
    torch.manual_seed(2)
    x = torch.randn((2,) + shape[1:], dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x,) + params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layer", ["groupnorm", "conv"])
def test_third_derivative_raises_instead_of_dropping_terms(layer):
    m = (nn.GroupNorm(3, 3) if layer == "groupnorm" else nn.Conv2d(3, 3, 3, padding=1)).double()
    use_double_backward_kernels(m)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).pow(3).sum(), list(m.parameters())[:1], create_graph=True)
    # a second derivative without a graph is fine ...
    torch.autograd.grad(g.pow(2).sum(), x, retain_graph=True)
    # ... a graph of it (the way to a third derivative) is refused with a clear message
    with pytest.raises(RuntimeError, match="second derivatives only"):
        torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("norm_impl", ["groupnorm", "basic"])
def test_convnet_unrolled_matching_gradient_matches_stock(norm_impl):
    """The engine's use: two unrolled SGD steps of a whole ConvNet-3, a backbone matching loss, gradients to the
    images and the step size; the swapped model gives the same numbers as the stock one."""
    torch.manual_seed(0)
    stock = create_model("convnet", 4, 3, 16, width=8, norm_impl=norm_impl).double()
    fast = copy.deepcopy(stock)
    assert use_double_backward_kernels(fast) >= 9  # 3 x (conv, norm, relu, pool)
    x0 = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    def run(model):
        names = [n for n, _ in model.named_parameters()]
        params = [p.detach().clone().requires_grad_(True) for _, p in model.named_parameters()]
        x = x0.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        cur = params
        for _ in range(2):
            out = torch.func.functional_call(model, dict(zip(names, cur)), (x,))
            grads = torch.autograd.grad(F.cross_entropy(out, y), cur, create_graph=True)
            cur = [p - lr * g for p, g in zip(cur, grads)]
        match = sum(((c - p.detach() * 0.9) ** 2).sum() for n, c, p in zip(names, cur, params)
                    if not n.startswith("classifier."))
        return torch.autograd.grad(match, [x, lr])

    for r, g in zip(run(stock), run(fast)):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_swap_keeps_state_dict_and_skips_unsupported():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
                      nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.ReLU(), nn.AvgPool2d(2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert use_double_backward_kernels(m) == 4
    assert type(m[0]) is nn.Conv2d  # string padding: not swapped
    assert type(m[1]) is nn.GroupNorm  # 2 groups over 4 channels is not instance norm
    assert type(m[2]) is nn.ReLU  # in-place
    assert isinstance(m[3], DoubleBackwardConv2d) and isinstance(m[4], DoubleBackwardInstanceNorm2d)
    assert isinstance(m[5], DoubleBackwardReLU) and isinstance(m[6], DoubleBackwardAvgPool2d)
    assert m.state_dict().keys() == before.keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    basic = nn.Sequential(InstanceNorm2dBasic(3))
    use_double_backward_kernels(basic)
    assert isinstance(basic[0], DoubleBackwardInstanceNorm2dBasic)
