"""The shared loop's first contact with real data: a small CNN on the genuine MNIST digits."""

from __future__ import annotations

from pathlib import Path

from common.config import compose
from common.example.train import CONFIG_DIR, run
from common.testing import require_or_skip, shared_data_dir


def test_small_cnn_reaches_95_percent_on_real_mnist(tmp_path: Path) -> None:
    root = require_or_skip(shared_data_dir("mnist"), "the real MNIST test set (shared/data/mnist)")
    # 8,000 / 2,000 deterministic split of the t10k digits; one epoch of the example job.
    cfg = compose(CONFIG_DIR, ["experiment=mnist_cnn", f"data.root={root}", "trainer.epochs=1",
                               f"output_dir={tmp_path}"])
    metrics = run(cfg)
    assert metrics["top1"] >= 95.0, metrics
