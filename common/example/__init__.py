"""A tiny classification job that shows the project's Hydra pattern end to end (and trains on MNIST)."""
