"""Profilers (DeepSpeed's ``deepspeed.profiling``): the flops profiler, the communication logger and the
memory estimators. See docs/observability.md."""
