"""Networks for distillation and evaluation, behind a timm-style registry.

>>> from ltdd.models import create_model, list_models
>>> model = create_model("convnet", num_classes=10, channels=3, im_size=32)

Every model exposes ``embed(x) -> (N, feat_dim)``, ``feat_dim`` and a final ``nn.Linear`` named ``classifier``;
``forward(x) == classifier(embed(x))``.
"""

from ltdd.models.registry import create_model, is_model, list_models, register_model  # noqa: I001
from ltdd.models import convnet as _convnet  # noqa: F401  (registers convnet, convnet_d4)
from ltdd.models import resnet as _resnet  # noqa: F401  (registers resnet18)
from ltdd.models import resnet_cifar as _resnet_cifar  # noqa: F401  (registers resnet32)
from ltdd.models import vgg as _vgg  # noqa: F401  (registers vgg11, alexnet)
from ltdd.models.convnet import ConvNet
from ltdd.models.functional import ParamLayout, functional_embed, functional_forward, load_flat
from ltdd.models.layers import EmbedClassifier, InstanceNorm2dBasic
from ltdd.models.resnet import ResNet
from ltdd.models.resnet_cifar import CifarResNet
from ltdd.models.vgg import VGG, AlexNet

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "is_model",
    "EmbedClassifier",
    "ConvNet",
    "InstanceNorm2dBasic",
    "ResNet",
    "CifarResNet",
    "VGG",
    "AlexNet",
    "ParamLayout",
    "functional_forward",
    "functional_embed",
    "load_flat",
]
