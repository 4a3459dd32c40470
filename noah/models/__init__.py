"""NOAH hosts: timm / torchvision / local backbones with the baseline or NOAH head (spec b.6, c)."""

from noah.models.classifier import Classifier, PreLogits
from noah.models.factory import (
    HOSTS,
    create_model,
    family_of,
    list_models,
    resolve_name,
    vision_transformer,
    vit_classifier,
)

__all__ = ["HOSTS", "Classifier", "PreLogits", "create_model", "family_of", "list_models", "resolve_name",
           "vision_transformer", "vit_classifier"]
