"""NOAH (Li, Zhou & Yao, arXiv 2402.02377): the Non-glObal Attentive Head (``noah.py``) on 26 timm hosts.

``noah.NOAH`` is the head (torch only); ``noah.create_model("mobilenetv2_050", head="noah")`` builds a row of
the paper's tables; ``noah.convert`` loads official checkpoints.

The entry points (``python -m noah.train|eval|bench|reproduce``, torchrun included) keep large host allocations
on the heap (``common.allocator``): glibc re-maps and page-faults every block above its mmap threshold on every
step, which on CPU cost the MobileNetV2 1.0x B=16 inference step about half its time, and more with NOAH, whose
(N, K, B, L) tensors are tens of MB. ``NOAH_HEAP=off`` keeps glibc's default. Importing the package as a library
changes nothing.
"""

from __future__ import annotations

from typing import Any

from common.allocator import apply_for_entry_points
from noah.noah import NOAH

__all__ = ["NOAH", "create_model"]

ENTRY_POINTS = {f"noah.{m}" for m in ("train", "eval", "bench", "reproduce")}
apply_for_entry_points(ENTRY_POINTS, "NOAH_HEAP")


def __getattr__(name: str) -> Any:  # lazy: importing the head must not import timm
    if name == "create_model":
        from noah.models import create_model

        return create_model
    raise AttributeError(f"module 'noah' has no attribute {name!r}")
