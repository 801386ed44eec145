"""Two-stage training: config, samplers, global-batch losses, checkpoints, validation and the loop."""
