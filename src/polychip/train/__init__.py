"""Training: optimiser, jitted step, metrics, checkpoints, the loop."""
