"""Training objectives: standalone losses over a model and a batch."""
