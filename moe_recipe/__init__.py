"""Training recipe around the MoE model: data, DeepSpeed engine wiring, checkpoints and metrics."""
