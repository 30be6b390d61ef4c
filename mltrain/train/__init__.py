"""Training: the step loop, the run around it, checkpoints, the prefix cache and disk checks."""
