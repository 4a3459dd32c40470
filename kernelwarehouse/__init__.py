"""KernelWarehouse (Li & Yao, ICML 2024): the method (``warehouse.py``), timm-based models, training code.

``kernelwarehouse.convert_model(timm_model, budget=4)`` turns a timm ResNet / MobileNetV2 / ConvNeXt / ViT into
its KW version; ``kernelwarehouse.create_model("kw1d4x_resnet18")`` builds a row of the paper's tables.

The entry points (``python -m kernelwarehouse.train|eval|bench|reproduce``, torchrun included) keep large
host allocations on the heap (``common.allocator``): KW's per-sample kernels are tens of MB per layer, and
glibc's default re-maps and page-faults them on every step. ``KW_HEAP=off`` keeps glibc's default. Importing
the package as a library changes nothing.
"""

from __future__ import annotations

from typing import Any

from common.allocator import apply_for_entry_points

__all__ = ["convert_model", "create_model"]

ENTRY_POINTS = {f"kernelwarehouse.{m}" for m in ("train", "eval", "bench", "reproduce")}
apply_for_entry_points(ENTRY_POINTS, "KW_HEAP")


def __getattr__(name: str) -> Any:  # lazy: importing the core (warehouse.py) must not import timm
    if name in __all__:
        from kernelwarehouse import models

        return getattr(models, name)
    raise AttributeError(f"module 'kernelwarehouse' has no attribute {name!r}")
