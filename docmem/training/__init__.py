"""Training a memory: the run's state between steps, checkpoints, signals, the training-time CE, summaries, sharded and LoRA runs."""
