"""NOAH (Li, Zhou & Yao, arXiv 2402.02377): the Non-glObal Attentive Head (``noah.py``) on 26 timm hosts.

``noah.NOAH`` is the head (torch only); ``noah.create_model("mobilenetv2_050", head="noah")`` builds a row of
the paper's tables; ``noah.convert`` loads official checkpoints.
"""

from __future__ import annotations

from typing import Any

from noah.noah import NOAH

__all__ = ["NOAH", "create_model"]


def __getattr__(name: str) -> Any:  # lazy: importing the head must not import timm
    if name == "create_model":
        from noah.models import create_model

        return create_model
    raise AttributeError(f"module 'noah' has no attribute {name!r}")
