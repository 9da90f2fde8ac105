"""Model registry and the CIFAR ResNet / plain family of He et al. (2015)."""

from gradlab.models import cifar_resnet  # noqa: F401  (registers the families)
from gradlab.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    GlobalAvgPool,
    ResidualAdd,
    ShortcutA,
)
from gradlab.models.registry import (
    ModelError,
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_family,
    register_model,
)

__all__ = ["BasicBlock", "CifarResNet", "GlobalAvgPool", "ResidualAdd", "ShortcutA",
           "ModelError", "ModelInfo", "create_model", "list_models", "model_info",
           "register_family", "register_model"]
