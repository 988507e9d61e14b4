"""Flat-parameter layout and torch.func forward passes, checked on every registered model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltdd.errors import LtddError
from ltdd.models import ParamLayout, create_model, functional_embed, functional_forward, list_models, load_flat

torch.set_num_threads(min(2, torch.get_num_threads()))

ALL_MODELS = list_models()
SIZE = 16
CLASSES = 5


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module", params=ALL_MODELS)
def built(request):
    """(name, model, layout, x, y) with randomised norm/affine parameters; each test works on a deep copy."""
    torch.manual_seed(0)
    model = create_model(request.param, num_classes=CLASSES, channels=3, im_size=SIZE)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and not n.startswith("classifier."):
                p.add_(0.1 * torch.randn_like(p))  # make norm scales/biases non-trivial
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.05 * torch.rand_like(b))
    x = torch.randn(2, 3, SIZE, SIZE)
    y = torch.tensor([1, 3])
    return request.param, model, ParamLayout(model), x, y


def test_forward_matches_module_eval(built):
    name, model, layout, x, _ = built
    model = copy.deepcopy(model).eval()
    flat = layout.flatten(model)
    assert flat.shape == (layout.total,) and not flat.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(functional_forward(model, layout, flat, x), model(x))
        torch.testing.assert_close(functional_embed(model, layout, flat, x), model.embed(x))


def test_forward_matches_module_train_with_buffer_copy(built):
    name, model, layout, x, _ = built
    model = copy.deepcopy(model).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flat = layout.flatten(model)
    with torch.no_grad():
        out_f = functional_forward(model, layout, flat, x, buffers)
        out_m = model(x)
    torch.testing.assert_close(out_f, out_m)
    # batch norm updated the copies exactly like the module's own running statistics
    for k, v in model.named_buffers():
        torch.testing.assert_close(buffers[k], v)
    if _has_bn(model):
        assert any(not torch.equal(buffers[k], v) for k, v in built[1].named_buffers())


def test_functional_forward_uses_flat_not_module(built):
    name, model, layout, x, _ = built
    model = copy.deepcopy(model).eval()
    flat = layout.flatten(model)
    other = flat + 0.01 * torch.randn_like(flat)
    with torch.no_grad():
        out_other = functional_forward(model, layout, other, x)
        ref = model(x)
        assert not torch.allclose(out_other, ref)
        load_flat(model, layout, other)
        torch.testing.assert_close(model(x), out_other)
        torch.testing.assert_close(layout.flatten(model), other)


def test_flatten_unflatten_round_trip(built):
    name, model, layout, _, _ = built
    flat = torch.randn(layout.total)
    parts = layout.unflatten(flat)
    assert list(parts) == layout.names == [n for n, _ in model.named_parameters()]
    for (n, p), shape in zip(model.named_parameters(), layout.shapes):
        assert parts[n].shape == p.shape == shape
    # views into flat
    assert parts[layout.names[0]].data_ptr() == flat.data_ptr()
    torch.testing.assert_close(layout.flatten(parts), flat)
    assert layout.offsets[0] == 0 and layout.offsets[-1] + layout.numels[-1] == layout.total
    torch.testing.assert_close(layout.flatten(dict(model.named_parameters())), layout.flatten(model))


def test_masks_partition_and_classifier_by_name(built):
    name, model, layout, _, _ = built
    all_m, bb, cl = layout.mask("all"), layout.mask("backbone"), layout.mask("classifier")
    assert all_m.all() and all_m.dtype == torch.bool and all_m.shape == (layout.total,)
    assert not (bb & cl).any() and (bb | cl).all()
    assert int(bb.sum()) == layout.backbone_size and int(cl.sum()) == layout.classifier_size
    # the classifier mask covers exactly the classifier.* parameters
    expect = torch.cat(
        [torch.full((p.numel(),), n.startswith("classifier."), dtype=torch.bool) for n, p in model.named_parameters()]
    )
    assert torch.equal(cl, expect)
    assert layout.classifier_size == model.classifier.weight.numel() + model.classifier.bias.numel()
    # slices agree with masks
    for kind, m in (("all", all_m), ("backbone", bb), ("classifier", cl)):
        from_slices = torch.zeros(layout.total, dtype=torch.bool)
        for s in layout.group_slices(kind):
            from_slices[s] = True
        assert torch.equal(from_slices, m)
        flat = torch.arange(layout.total, dtype=torch.float64)
        torch.testing.assert_close(layout.select(flat, kind), flat[m])


def test_grad_matches_module_grad(built):
    name, model, layout, x, y = built
    model = copy.deepcopy(model).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flat = layout.flatten(model).requires_grad_(True)
    loss_f = F.cross_entropy(functional_forward(model, layout, flat, x, buffers), y)
    (g,) = torch.autograd.grad(loss_f, flat)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(g, layout.flatten_grad(model), rtol=1e-4, atol=1e-6)
    assert model.classifier.weight.grad is not None


def test_double_backward_to_input(built):
    """One unrolled SGD step on the flat vector, then a loss on the result, back-propagated to the images (MTT)."""
    name, model, layout, x, y = built
    model = copy.deepcopy(model).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = x.clone().requires_grad_(True)
    flat = layout.flatten(model).requires_grad_(True)
    loss = F.cross_entropy(functional_forward(model, layout, flat, x, buffers), y)
    (g,) = torch.autograd.grad(loss, flat, create_graph=True)
    flat2 = flat - 0.1 * g
    target = flat.detach() + 0.01
    match = (layout.select(flat2, "backbone") - layout.select(target, "backbone")).square().sum()
    match.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layout_errors():
    model = create_model("convnet", 3, 1, 8, width=4)
    layout = ParamLayout(model)
    with pytest.raises(ValueError, match="unknown parameter group"):  # a programming error, not user input
        layout.mask("head")
    with pytest.raises(ValueError, match="unknown parameter group"):
        layout.group_slices("weights")
    with pytest.raises(LtddError):
        layout.unflatten(torch.zeros(layout.total + 1))
    with pytest.raises(LtddError):
        layout.unflatten(torch.zeros(1, layout.total))
    with pytest.raises(LtddError):
        layout.flatten({"classifier.weight": torch.zeros(3, 4)})
    with pytest.raises(LtddError):
        load_flat(create_model("convnet", 3, 1, 8, width=8), layout, torch.zeros(layout.total))


def test_layout_properties_convnet():
    layout = ParamLayout(create_model("convnet", 10))
    assert layout.group_slices("classifier") == [slice(299_520, 320_010)]
    assert layout.group_slices("backbone") == [slice(0, 299_520)]
    assert layout.group_slices("all") == [slice(0, 320_010)]
    assert len(layout) == 320_010
    assert "320010" in repr(layout)


def test_functional_embed_is_differentiable():
    torch.manual_seed(0)
    model = create_model("convnet", 4, 3, 8, width=8)
    layout = ParamLayout(model)
    flat = layout.flatten(model).requires_grad_(True)
    feat = functional_embed(model, layout, flat, torch.randn(2, 3, 8, 8))
    (g,) = torch.autograd.grad(feat.sum(), flat)
    assert g[layout.mask("backbone")].abs().sum() > 0
    assert g[layout.mask("classifier")].abs().sum() == 0
