"""The training loop and its parts: optimizer, LR schedule, precision, activation recompute, eval."""
