"""Test utilities, reusable by users: the multi-process harness and small reference models."""

from deepshard.testing.harness import DistributedHarness, RankError, free_port

__all__ = ["DistributedHarness", "RankError", "free_port"]
