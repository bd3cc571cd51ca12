"""Training: optax optimizer and schedules, the jitted train step, orbax checkpoints, the loop."""
