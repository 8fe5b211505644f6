"""Training: the loop (`trainer`), the step (`step`), objectives, optimizers, schedules, checkpoints, distributed."""
