"""Af-DCD (NeurIPS 2023): augmentation-free dense contrastive distillation for semantic segmentation.

The entry points (``python -m afdcd.train|eval|bench|reproduce|infer``, torchrun included) keep large host
allocations on the heap (``common.allocator``): glibc maps and unmaps every block above its mmap threshold,
and the loss module's 151 MB generator gradients (and its conv buffers) were page-faulted again on every CPU
step: ~0.25 s of a 4 s Af-DCD step at a 128x256 crop (README, Bench). ``AFDCD_HEAP=off`` keeps glibc's
default. Importing the package as a library changes nothing.
"""

from __future__ import annotations

from common.allocator import apply_for_entry_points

ENTRY_POINTS = {f"afdcd.{m}" for m in ("train", "eval", "bench", "reproduce", "infer")}
apply_for_entry_points(ENTRY_POINTS, "AFDCD_HEAP")
