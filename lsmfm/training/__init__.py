"""Training infrastructure: DeepSpeed engine, EMA, schedules, checkpoints, logging."""
