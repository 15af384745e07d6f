"""Stage recipes, the DeepSpeed training loop, and atomic resumable checkpoints."""
