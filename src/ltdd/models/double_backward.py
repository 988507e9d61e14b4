"""Layers with hand-written first and second derivatives, and :func:`use_double_backward_kernels` to swap them in.

Back-propagating through unrolled SGD steps (MTT) differentiates the network's *backward* pass, and PyTorch's
built-in second derivatives of the ConvNet layers are slow: instance norm's double backward is a long composite of
elementwise ops, ReLU and average pooling materialise and accumulate all-zero gradients for their saved forward
tensors, and the convolution's double backward computes its weight term (a transposed-batch convolution) even when
the running backward pass does not need it. :func:`use_double_backward_kernels` swaps, in place, a model's
``nn.Conv2d``, instance-norm (``GroupNorm(C, C)`` / :class:`InstanceNorm2dBasic`), ``nn.ReLU`` and ``nn.AvgPool2d``
modules for subclasses with hand-written first *and* second derivatives (same parameters and names; the same
outputs and derivatives up to float rounding; the trajectory-matching engine does this to its own model). Their
second derivatives compute only the terms that the running backward pass needs (``torch._C._will_engine_execute_node``,
as ``torch.autograd.graph.register_multi_grad_hook`` does), so e.g. the constant-memory mode, which needs no
gradient w.r.t. the student's weights there, skips those convolutions. Without a graph to record (a plain
first-order backward) they call PyTorch's own backward kernels. Also faster on CPU: the input gradient of a layer
with <= 4 input channels (the image layer) as a batched matrix product and ``fold``, and 2x2/stride-2 average
pooling as two adds of contiguous halves. The instance-norm and convolution second derivatives cannot be
differentiated again: asking for a graph of them (``create_graph=True`` through a second derivative, i.e. a third
derivative) raises at once. (PyTorch's ``once_differentiable`` would only raise on a full ``.backward()`` and
silently drop the term under ``torch.autograd.grad(..., inputs)``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.modules.utils import _pair

from ltdd.models.layers import InstanceNorm2dBasic

__all__ = [
    "use_double_backward_kernels",
    "DoubleBackwardConv2d",
    "DoubleBackwardInstanceNorm2d",
    "DoubleBackwardInstanceNorm2dBasic",
    "DoubleBackwardReLU",
    "DoubleBackwardAvgPool2d",
]

_conv_backward = torch.ops.aten.convolution_backward
_threshold_backward = torch.ops.aten.threshold_backward
_avg_pool2d_backward = torch.ops.aten.avg_pool2d_backward


def _grad_node(t):
    """The autograd node a gradient w.r.t. ``t`` flows into (None when ``t`` needs no gradient)."""
    if not isinstance(t, Tensor) or not t.requires_grad:
        return None
    return torch.autograd.graph._get_grad_fn_or_grad_acc(t)


def _will_run(node) -> bool:
    """Whether the running backward pass needs the gradient flowing into ``node``."""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # a leaf inside autograd.grad(): not knowable, so assume it is needed
        return True


def _no_third_derivative(backward):
    """Run a second derivative without recording a graph, and refuse to be differentiated again.

    Raises when called with grad mode on and an incoming gradient that requires grad (someone asked for a third
    derivative); unlike ``once_differentiable`` this cannot be bypassed by ``torch.autograd.grad`` to chosen inputs.
    """

    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(isinstance(g, Tensor) and g.requires_grad for g in grads):
            raise RuntimeError("ltdd's double-backward kernels support second derivatives only (a third derivative "
                               "was asked for); build the model without use_double_backward_kernels")
        with torch.no_grad():
            return backward(ctx, *grads)

    wrapper.__doc__ = backward.__doc__
    return wrapper


def _fold_input_grad(x: Tensor, w: Tensor, groups: int) -> bool:
    """Whether :func:`_conv_input_grad` uses the matrix product + ``fold`` formulation (CPU, <= 4 input channels)."""
    return groups == 1 and w.shape[1] <= 4 and x.dim() == 4 and x.device.type == "cpu"


def _conv_input_grad(gy: Tensor, x: Tensor, w: Tensor, conv) -> Tensor:
    """Gradient of ``conv2d(x, w)`` w.r.t. ``x`` for the output gradient ``gy``.

    For a layer with few input channels (the image layer: 1 or 3) on CPU this is a batched matrix product and
    ``fold`` (col2im), about 2.5x faster than oneDNN's backward-data convolution with so few output channels.
    """
    stride, padding, dilation, groups = conv
    co, ci, kh, kw = w.shape
    if _fold_input_grad(x, w, groups):
        n = gy.shape[0]
        wt = w.reshape(co, ci * kh * kw).t().unsqueeze(0).expand(n, ci * kh * kw, co)
        cols = torch.bmm(wt, gy.reshape(n, co, -1))  # (not matmul: it would copy gy into a transposed layout)
        return F.fold(cols, x.shape[-2:], (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return _conv_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False])[0]


def _conv_grads(gy: Tensor, x: Tensor, w: Tensor, bias_sizes, conv, mask):
    """(dx, dw, db) of ``conv2d`` as selected by ``mask`` (None where not selected)."""
    stride, padding, dilation, groups = conv
    gx = None
    if mask[0] and _fold_input_grad(x, w, groups):
        gx, mask = _conv_input_grad(gy, x, w, conv), [False, mask[1], mask[2]]
    if any(mask):
        gx2, gw, gb = _conv_backward(gy, x, w, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask)
        gx = gx if gx is not None else gx2
    else:
        gw = gb = None
    return gx, gw, gb


class _ConvBackward(Function):
    """(gy, x, w) -> (dx, dw, db) of ``conv2d``; its backward is the convolution's second derivative."""

    @staticmethod
    def forward(ctx, gy, x, w, bias_sizes, conv, mask):
        gx, gw, gb = _conv_grads(gy, x, w, bias_sizes, conv, mask)
        ctx.save_for_backward(gy, x, w)
        ctx.conv = conv
        ctx.nodes = (_grad_node(gy), _grad_node(x), _grad_node(w))
        return gx, gw, gb

    @staticmethod
    @_no_third_derivative
    def backward(ctx, ux, uw, ub):
        gy, x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_gy, need_x, need_w = (_will_run(n) for n in ctx.nodes)
        ct_gy = ct_x = ct_w = None
        if need_gy:  # gx = J_x(w)^T gy, gw = J_w(x)^T gy and gb = sum(gy) are linear in gy
            if ux is not None:
                ct_gy = F.conv2d(ux, w, ub, stride, padding, dilation, groups)
                if uw is not None:
                    ct_gy = ct_gy.add_(F.conv2d(x, uw, None, stride, padding, dilation, groups))
            elif uw is not None:
                ct_gy = F.conv2d(x, uw, ub, stride, padding, dilation, groups)
            elif ub is not None:
                ct_gy = ub.reshape(1, -1, *([1] * (gy.dim() - 2))).expand_as(gy)
        if need_w and ux is not None:  # <ux, J_x(w)^T gy> = <conv(ux, w), gy>
            ct_w = _conv_backward(gy, ux, w, None, stride, padding, dilation, False, [0, 0], groups,
                                  [False, True, False])[1]
        if need_x and uw is not None:  # <uw, J_w(x)^T gy> = <conv(x, uw), gy>
            ct_x = _conv_input_grad(gy, x, uw, ctx.conv)
        return ct_gy, ct_x, ct_w, None, None, None


class _Conv2d(Function):
    @staticmethod
    def forward(ctx, x, w, b, conv):
        stride, padding, dilation, groups = conv
        ctx.save_for_backward(x, w)
        ctx.conv = conv
        ctx.has_bias = b is not None
        ctx.nodes = (_grad_node(x), _grad_node(w), _grad_node(b))
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        mask = [_will_run(n) for n in ctx.nodes]
        bias_sizes = [w.shape[0]] if ctx.has_bias else None
        if not torch.is_grad_enabled():  # first-order backward only: no graph to record
            gx, gw, gb = _conv_grads(gy, x, w, bias_sizes, ctx.conv, mask)
        else:
            gx, gw, gb = _ConvBackward.apply(gy, x, w, bias_sizes, ctx.conv, mask)
        return gx, gw, gb, None


class _InstanceNormBackward(Function):
    """(gz, x, w; mean, rstd) -> (dx, dw, db) of instance norm z = w (x - mean) rstd + b, per sample and channel.

    With xh = (x - mean) rstd, A = mean(gz) and B = mean(gz xh) over the spatial positions:
    dx = w rstd (gz - A - xh B), dw = S sum_n B, db = S sum_n A (S = number of positions). The backward of this
    map (the norm's second derivative) is written out below in the same per-row-coefficient form, so that every
    full-size tensor is produced by one or two fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, gz, x, w, mu, r):
        n, c = x.shape[:2]
        gz3, x3 = gz.reshape(n, c, -1), x.reshape(n, c, -1)
        s = x3.shape[-1]
        a = gz3.mean(-1)
        b = r * ((gz3 * x3).sum(-1) / s - mu * a)
        wr = w * r
        # dx = wr gz - wr r B x + wr (r B mu - A)
        gx = torch.addcmul((wr * (r * b * mu - a)).unsqueeze(-1), x3, (-wr * r * b).unsqueeze(-1))
        gx.addcmul_(gz3, wr.unsqueeze(-1))
        ctx.save_for_backward(gz, x, w, mu, r, a, b)
        ctx.nodes = (_grad_node(gz), _grad_node(x), _grad_node(w))
        return gx.view(x.shape), s * b.sum(0), s * a.sum(0)

    @staticmethod
    @_no_third_derivative
    def backward(ctx, u, om, be):
        gz, x, w, mu, r, a, b = ctx.saved_tensors
        need_gz, need_x, need_w = (_will_run(n) for n in ctx.nodes)
        n, c = x.shape[:2]
        gz3, x3 = gz.reshape(n, c, -1), x.reshape(n, c, -1)
        s = x3.shape[-1]
        zero = torch.zeros_like(a)
        om = zero if om is None else om.expand_as(a)
        be = zero if be is None else be.expand_as(a)
        wr = w * r
        if u is not None:
            u3 = u.reshape(n, c, -1)
            ub = u3.mean(-1)  # mean(u)
            u1 = r * ((u3 * x3).sum(-1) / s - mu * ub)  # mean(u xh)
            q = (u3 * gz3).sum(-1) / s - ub * a - u1 * b  # mean(u gz) - mean(u) A - mean(u xh) B
        else:
            ub = u1 = q = zero
        ct_gz = ct_x = ct_w = None
        kx = om * r - wr * r * u1  # coefficient of (x - mean) in ct_gz and of gz in ct_x
        if need_gz:  # ct_gz = w r (u - mean(u) - xh mean(u xh)) + om xh + be
            ct_gz = torch.addcmul((be - wr * ub - kx * mu).unsqueeze(-1), x3, kx.unsqueeze(-1))
            if u is not None:
                ct_gz.addcmul_(u3, wr.unsqueeze(-1))
            ct_gz = ct_gz.view(x.shape)
        if need_x:  # ct_x = -w r^2 [B u + U1 gz + (Q - 2 B U1) xh - (B Ub + A U1)] + om r (gz - A - xh B)
            c_xh = -wr * r * (q - 2 * b * u1) - om * r * b
            c_0 = wr * r * (b * ub + a * u1) - om * r * a
            ct_x = torch.addcmul((c_0 - c_xh * r * mu).unsqueeze(-1), x3, (c_xh * r).unsqueeze(-1))
            ct_x.addcmul_(gz3, kx.unsqueeze(-1))
            if u is not None:
                ct_x.addcmul_(u3, (-wr * r * b).unsqueeze(-1))
            ct_x = ct_x.view(x.shape)
        if need_w and u is not None:
            ct_w = (s * r * q).sum(0)
        return ct_gz, ct_x, ct_w, None, None


class _InstanceNorm(Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        n, c = x.shape[:2]
        z, mu, r = torch.native_group_norm(x, w, b, n, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, w, mu, r)
        return z

    @staticmethod
    def backward(ctx, gz):
        x, w, mu, r = ctx.saved_tensors
        if not torch.is_grad_enabled():  # first-order backward only: PyTorch's fused kernel
            n, c = x.shape[:2]
            gx, gw, gb = torch.ops.aten.native_group_norm_backward(gz, x, mu, r, w, n, c, x[0, 0].numel(), c,
                                                                     list(ctx.needs_input_grad[:3]))
        else:
            gx, gw, gb = _InstanceNormBackward.apply(gz, x, w, mu, r)
        return gx, gw, gb, None


class _ReLUBackward(Function):
    @staticmethod
    def forward(ctx, g, y):
        ctx.save_for_backward(y)
        return _threshold_backward(g, y, 0)

    @staticmethod
    def backward(ctx, u):  # linear in g; zero derivative w.r.t. y (no all-zero tensor is materialised)
        (y,) = ctx.saved_tensors
        return _ReLUBackward.apply(u, y), None


class _ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # first-order backward only
            return _threshold_backward(g, y, 0)
        return _ReLUBackward.apply(g, y)


def _is_pool2x2(x: Tensor, pool) -> bool:
    """2x2 windows, stride 2, no padding, even contiguous NCHW input on CPU: the case of the faster kernels below."""
    return (pool[0] == [2, 2] and pool[1] == [2, 2] and pool[2] == [0, 0] and pool[5] is None and x.dim() == 4
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.is_contiguous() and x.device.type == "cpu")


def _pool2x2(x: Tensor) -> Tensor:
    """2x2 average pool as two adds of contiguous halves (several times faster than avg_pool2d on CPU)."""
    n, c, h, w = x.shape
    rows = x.view(n, c, h // 2, 2, w)
    s = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(n, c, h // 2, w // 2, 2)
    return (s[..., 0] + s[..., 1]).mul_(0.25)


def _unpool2x2(g: Tensor) -> Tensor:
    """Adjoint of :func:`_pool2x2`: every output value spread (/4) over its 2x2 window."""
    n, c, h, w = g.shape
    cols = g.mul(0.25).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 1, 2 * w)
    return cols.expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


class _AvgPool2dBackward(Function):
    @staticmethod
    def forward(ctx, g, x, pool):
        ctx.save_for_backward(x)
        ctx.pool = pool
        if _is_pool2x2(x, pool):
            return _unpool2x2(g)
        return _avg_pool2d_backward(g, x, *pool)

    @staticmethod
    def backward(ctx, u):  # linear in g and independent of x's values
        (x,) = ctx.saved_tensors
        return _AvgPool2d.apply(u, ctx.pool), None, None


class _AvgPool2d(Function):
    @staticmethod
    def forward(ctx, x, pool):
        ctx.save_for_backward(x)
        ctx.pool = pool
        if _is_pool2x2(x, pool):
            return _pool2x2(x)
        return F.avg_pool2d(x, *pool)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # first-order backward only: no graph to record
            return (_unpool2x2(g) if _is_pool2x2(x, ctx.pool) else _avg_pool2d_backward(g, x, *ctx.pool)), None
        return _AvgPool2dBackward.apply(g, x, ctx.pool), None


class DoubleBackwardConv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding given as numbers) with a second derivative that computes only what is needed."""

    def forward(self, x: Tensor) -> Tensor:
        conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        return _Conv2d.apply(x, self.weight, self.bias, conv)


class DoubleBackwardInstanceNorm2d(nn.GroupNorm):
    """``GroupNorm(C, C, affine=True)`` (instance norm) with hand-written first and second derivatives."""

    def forward(self, x: Tensor) -> Tensor:
        return _InstanceNorm.apply(x, self.weight, self.bias, self.eps)


class DoubleBackwardInstanceNorm2dBasic(InstanceNorm2dBasic):
    """:class:`InstanceNorm2dBasic` (affine) with hand-written first and second derivatives."""

    def forward(self, x: Tensor) -> Tensor:
        return _InstanceNorm.apply(x, self.weight, self.bias, self.eps)


class DoubleBackwardReLU(nn.ReLU):
    """``nn.ReLU`` whose second derivative does not materialise zeros (the derivative w.r.t. the saved output)."""

    def forward(self, x: Tensor) -> Tensor:
        return _ReLU.apply(x)


class DoubleBackwardAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose second derivative does not materialise zeros (2x2/stride 2: also a faster kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        k = _pair(self.kernel_size)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        pool = (list(k), list(stride), list(_pair(self.padding)), self.ceil_mode, self.count_include_pad,
                self.divisor_override)
        return _AvgPool2d.apply(x, pool)


def use_double_backward_kernels(model: nn.Module) -> int:
    """Swap (in place) the model's layers for the ``DoubleBackward*`` variants; returns how many were swapped.

    Only exact types are swapped (subclasses keep their own ``forward``): ``nn.Conv2d`` with zero padding given as
    numbers, ``nn.GroupNorm`` with one group per channel and an affine transform, affine
    :class:`InstanceNorm2dBasic`, non-in-place ``nn.ReLU`` and ``nn.AvgPool2d``. Parameters, buffers, names and
    outputs do not change, so ``state_dict``, :class:`~ltdd.models.functional.ParamLayout` and checkpoints are
    unaffected.
    """
    swapped = 0
    for m in model.modules():
        cls = type(m)
        new = None
        if cls is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            new = DoubleBackwardConv2d
        elif cls is nn.GroupNorm and m.affine and m.num_groups == m.num_channels:
            new = DoubleBackwardInstanceNorm2d
        elif cls is InstanceNorm2dBasic and m.affine:
            new = DoubleBackwardInstanceNorm2dBasic
        elif cls is nn.ReLU and not m.inplace:
            new = DoubleBackwardReLU
        elif cls is nn.AvgPool2d:
            new = DoubleBackwardAvgPool2d
        if new is not None:
            m.__class__ = new
            swapped += 1
    return swapped
