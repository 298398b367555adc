"""ZeRO: sharded parameters, gradients and optimizer state (stage 0 = plain data parallelism)."""
