"""Training pipeline: corpus preparation, batching, the trainer and evaluation."""
