"""Training: the trainer, its stages and token-weighting recipes, checkpoints, parallelism, tracking."""
