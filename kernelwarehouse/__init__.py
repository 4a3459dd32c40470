"""KernelWarehouse (Li & Yao, ICML 2024): the method (``warehouse.py``), timm-based models, training code.

``kernelwarehouse.convert_model(timm_model, budget=4)`` turns a timm ResNet / MobileNetV2 / ConvNeXt / ViT into
its KW version; ``kernelwarehouse.create_model("kw1d4x_resnet18")`` builds a row of the paper's tables.
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_model", "create_model"]


def __getattr__(name: str) -> Any:  # lazy: importing the core (warehouse.py) must not import timm
    if name in __all__:
        from kernelwarehouse import models

        return getattr(models, name)
    raise AttributeError(f"module 'kernelwarehouse' has no attribute {name!r}")
