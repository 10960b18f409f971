"""Measurements: speed and memory of the training step, GradCache and the embedding path."""
