"""RLDD's BatchNorm networks: CIFAR ResNet-32 and ConvNet-3 with batch norm (observer / teacher)."""

import pytest
import torch
from torch import nn

from ltdd.errors import LtddError
from ltdd.models import ParamLayout, create_model


def test_resnet32_parameter_count_by_hand():
    # stem 3*16*9 + BN 2*16; stage 1: 5 blocks x (2 convs 16*16*9 + 2 BN 2*16);
    # stage 2: first block 16*32*9 + 32*32*9 + 2 BN 2*32, then 4 x (2*32*32*9 + 2*2*32); stage 3 likewise with 64;
    # option-A shortcuts have no parameters; head 64*10 + 10
    stem = 3 * 16 * 9 + 32
    s1 = 5 * (2 * 16 * 16 * 9 + 2 * 32)
    s2 = (16 * 32 * 9 + 32 * 32 * 9 + 128) + 4 * (2 * 32 * 32 * 9 + 128)
    s3 = (32 * 64 * 9 + 64 * 64 * 9 + 256) + 4 * (2 * 64 * 64 * 9 + 256)
    layout = ParamLayout(create_model("resnet32", 10, 3, 32))
    assert layout.backbone_size == stem + s1 + s2 + s3 == 463_504
    assert layout.classifier_size == 650
    assert layout.total == 464_154  # the "0.46M" of He et al.'s table 6


def test_resnet32_structure():
    m = create_model("resnet32", 10, 3, 32)
    assert [len(s) for s in m.stages] == [5, 5, 5]
    assert [s[0].conv1.out_channels for s in m.stages] == [16, 32, 64]
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 31  # + the head = 32 weighted layers
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 31
    assert m.feat_dim == 64
    x = torch.randn(2, 3, 32, 32)
    # the stride-2 blocks halve the map: 32 -> 16 -> 8
    h = m.stages[0](torch.relu(m.norm1(m.conv1(x))))
    assert m.stages[2](m.stages[1](h)).shape == (2, 64, 8, 8)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in create_model("resnet32", 3, norm="none").modules())
    with pytest.raises(LtddError):
        create_model("resnet32", 10, norm="layernorm")


def test_convnet_with_batchnorm_is_convnet3_bn():
    m = create_model("convnet", 10, 3, 32, norm="batchnorm")
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 3 and all(b.num_features == 128 for b in bns)
    assert m(torch.randn(4, 3, 32, 32)).shape == (4, 10)
