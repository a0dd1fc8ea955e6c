"""ResNet backbones of He et al. (2016) and their ImageNet pretraining.

``resnet.py`` the whole family (variants as arguments); ``checkpoint.py`` and ``foreign_weights.py`` backbone
files and weights from elsewhere (MSRA ``R-*.pkl``, Detectron2, torchvision, timm); ``imagedata.py`` the
ImageNet data code pretraining and localization share (folder scanning, holdout, sampler, PCA lighting,
normalisation); ``shapes.py`` the synthetic shapes; ``engine/`` the run infrastructure every application
shares; ``pretraining/`` the classification application. Imports only ``engine/`` of its own and third-party
packages; never ``detection``."""
from .checkpoint import (
    CheckpointError,
    backbone_checkpoint,
    convert_torchvision_state_dict,
    load_backbone_weights,
    read_backbone_checkpoint,
)
from .complexity import count_multiply_adds, count_parameters
from .resnet import (
    ResNet,
    build_resnet,
    cifar_plain,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet56,
    cifar_resnet110,
    convert_bn_to_frozen,
    plain18,
    plain34,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)


def resnet_from_arch(arch: dict, **overrides) -> ResNet:
    """Rebuild a ResNet from the ``arch`` dict stored in a backbone checkpoint."""
    kwargs = dict(arch)
    kwargs.update(overrides)
    return ResNet(**kwargs)
