"""Training loops and their parts: optimiser, checkpoints, logging."""
