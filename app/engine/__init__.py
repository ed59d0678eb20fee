"""Inference, no HTTP: Engine -> ModelEngine (loop) -> Scheduler (plan) -> Runner (tensors) -> Kernels."""
