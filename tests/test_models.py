"""Model registry and architectures: shapes, parameter counts, the embed/classifier contract, norm variants."""

import pytest
import torch
from torch import nn

from ltdd.errors import LtddError
from ltdd.models import (
    ConvNet,
    InstanceNorm2dBasic,
    ParamLayout,
    create_model,
    list_models,
    register_model,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

ALL_MODELS = list_models()
# (channels, image size): digits (1 channel, 8 and 28 px) and colour images (16, 32, 64 px).
SHAPES = [(1, 8), (1, 28), (3, 16), (3, 32), (3, 64)]


def test_required_models_registered():
    for name in ("convnet", "convnet_d4", "resnet18", "vgg11", "alexnet"):
        assert name in ALL_MODELS
    assert list_models("convnet*") == ["convnet", "convnet_d4"]


def test_unknown_model_lists_known_names():
    with pytest.raises(LtddError) as info:
        create_model("convnet7", num_classes=10)
    msg = str(info.value)
    assert "convnet7" in msg and "resnet18" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("convnet", {"depthh": 3}),
        ("convnet", {"norm": "weirdnorm"}),
        ("convnet", {"act": "swishy"}),
        ("convnet", {"pool": "sumpool"}),
        ("convnet", {"norm_impl": "cuda"}),
        ("resnet18", {"norm": "layernorm"}),
        ("vgg11", {"norm": "groupnorm"}),
        ("alexnet", {"depth": 3}),
    ],
)
def test_bad_options_raise_ltdd_error(name, kwargs):
    with pytest.raises(LtddError):
        create_model(name, num_classes=10, **kwargs)


def test_bad_im_size_raises():
    with pytest.raises(LtddError):
        create_model("convnet", 10, im_size=(32, 32, 3))
    with pytest.raises(LtddError):
        create_model("convnet", 10, im_size="big")


def test_register_duplicate_name_rejected():
    with pytest.raises(ValueError):

        @register_model("convnet")
        def other(num_classes, channels=3, im_size=(32, 32)):  # pragma: no cover
            return nn.Linear(1, 1)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_output_shape_and_contract(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, channels=channels, im_size=size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
        feat = model.embed(x)
    assert out.shape == (2, 7)
    assert isinstance(model.classifier, nn.Linear)
    assert feat.shape == (2, model.feat_dim)
    assert model.classifier.in_features == model.feat_dim
    torch.testing.assert_close(model.classifier(feat), out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_classifier_params_named_classifier(name):
    model = create_model(name, num_classes=5, channels=3, im_size=16)
    head = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    assert sorted(head) == ["classifier.bias", "classifier.weight"]


def test_convnet3_parameter_counts():
    model = create_model("convnet", num_classes=10, channels=3, im_size=(32, 32))
    layout = ParamLayout(model)
    assert sum(p.numel() for p in model.parameters()) == 320_010
    assert layout.total == 320_010
    assert layout.backbone_size == 299_520
    assert layout.classifier_size == 20_490
    assert model.feat_dim == 2048
    # CIFAR-100 head
    assert ParamLayout(create_model("convnet", 100, 3, 32)).total == 504_420


def test_convnet_d4_parameter_counts():
    model = create_model("convnet_d4", num_classes=200, channels=3, im_size=64)
    layout = ParamLayout(model)
    assert layout.backbone_size == 447_360
    assert layout.total == 857_160
    assert model.feat_dim == 2048


@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm"])
def test_resnet18_backbone_count(norm):
    layout = ParamLayout(create_model("resnet18", 10, 3, 32, norm=norm))
    assert layout.backbone_size == 11_168_832
    assert layout.classifier_size == 5_130


def test_convnet_structure_and_norms():
    m = create_model("convnet", 10)
    assert isinstance(m, ConvNet)
    norms = [l for l in m.features if isinstance(l, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert sum(isinstance(l, nn.AvgPool2d) for l in m.features) == 3
    bn = create_model("convnet", 10, norm="batchnorm", pool="maxpool", act="leakyrelu")
    assert sum(isinstance(l, nn.BatchNorm2d) for l in bn.features) == 3
    assert sum(isinstance(l, nn.MaxPool2d) for l in bn.features) == 3
    ln = create_model("convnet", 10, norm="layernorm", im_size=16)
    assert [tuple(l.normalized_shape) for l in ln.features if isinstance(l, nn.LayerNorm)] == [
        (128, 16, 16),
        (128, 8, 8),
        (128, 4, 4),
    ]
    assert ln(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    nn_ = create_model("convnet", 10, norm="none", pool="none", im_size=8, width=16, depth=2)
    assert nn_.feat_dim == 16 * 8 * 8
    assert not any(isinstance(l, (nn.GroupNorm, nn.BatchNorm2d)) for l in nn_.features)


def test_pools_skipped_for_tiny_inputs():
    m = create_model("convnet", 10, channels=1, im_size=8, depth=4, width=8)
    assert sum(isinstance(l, nn.AvgPool2d) for l in m.features) == 3
    assert m.feat_dim == 8
    m = create_model("convnet", 10, channels=1, im_size=28, width=8)
    assert m.feat_dim == 8 * 3 * 3


def test_instancenorm_basic_matches_groupnorm():
    torch.manual_seed(0)
    gn = nn.GroupNorm(6, 6, affine=True)
    basic = InstanceNorm2dBasic(6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    basic.load_state_dict(gn.state_dict())
    assert [(n, p.shape) for n, p in basic.named_parameters()] == [(n, p.shape) for n, p in gn.named_parameters()]
    x = torch.randn(3, 6, 5, 7) * 3 + 1
    torch.testing.assert_close(basic(x), gn(x), rtol=1e-5, atol=1e-5)


def test_convnet_norm_impls_interchangeable():
    torch.manual_seed(0)
    a = create_model("convnet", 10, 3, 16, width=16, norm_impl="groupnorm")
    b = create_model("convnet", 10, 3, 16, width=16, norm_impl="basic")
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(ya.square().sum(), x)
    (gb,) = torch.autograd.grad(yb.square().sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "alexnet"])
@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm", "none"])
def test_norm_options(name, norm):
    m = create_model(name, 3, 3, 8, norm=norm)
    kinds = {type(l) for l in m.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == "batchnorm")
    assert (nn.GroupNorm in kinds) == (norm == "instancenorm")
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_vgg11_and_alexnet_feature_sizes():
    assert create_model("vgg11", 10, 3, 32).feat_dim == 512
    assert create_model("vgg11", 10, 3, 64).feat_dim == 2048
    assert create_model("alexnet", 10, 3, 32).feat_dim == 192 * 4 * 4
    assert create_model("resnet18", 10, 3, 64).feat_dim == 512
