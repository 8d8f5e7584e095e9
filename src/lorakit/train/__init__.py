"""Training: the loop, optimizer and schedule, checkpoints, metrics, distributed hooks."""
