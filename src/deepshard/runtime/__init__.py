"""The training runtime: engine, optimizers, LR schedules and the data loader."""
