"""Models by Fast-Datafree registry name (spec c): `create_model(name, num_classes)`."""

from __future__ import annotations

from torch import nn

from common.errors import UserError

from .cifar import MODEL_DICT
from .deeplab import SEGMENTATION_MODEL_DICT, DeepLabV3, deeplabv3_mobilenet, deeplabv3_resnet50

__all__ = ["MODEL_DICT", "SEGMENTATION_MODEL_DICT", "DeepLabV3", "create_model", "deeplabv3_mobilenet",
           "deeplabv3_resnet50", "model_names"]


def model_names() -> list[str]:
    """Every registry key: the CIFAR classifiers, then the two DeepLabV3."""
    return [*MODEL_DICT, *SEGMENTATION_MODEL_DICT]


def create_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised network by its Fast-Datafree registry key (`wrn40_2`, `deeplabv3_mobilenet`, ...)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in MODEL_DICT:
        return MODEL_DICT[name](num_classes)
    if name in SEGMENTATION_MODEL_DICT:
        return SEGMENTATION_MODEL_DICT[name](num_classes)
    raise UserError(f"unknown model '{name}'; valid names: {', '.join(model_names())}")
