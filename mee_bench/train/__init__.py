"""Training: config, data, objectives, the loop, checkpoints, the tokenizer and exit-head training."""
