"""Ske2Grid (ICML 2023): skeleton-to-grid representation learning for action recognition."""
