"""Af-DCD (NeurIPS 2023): augmentation-free dense contrastive distillation for semantic segmentation."""
