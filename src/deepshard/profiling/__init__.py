"""Profilers (DeepSpeed's ``deepspeed.profiling``): the flops profiler and the memory estimators. The
communication logger observes ``deepshard.comm`` and lives there (:mod:`deepshard.comm.comms_log`). See
docs/observability.md."""
