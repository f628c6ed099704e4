"""Performance tooling: the train-step benchmark (ours vs a PyTorch peer)."""
