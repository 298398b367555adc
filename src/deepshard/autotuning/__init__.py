"""The autotuner (DeepSpeed's ``deepspeed.autotuning``): ZeRO stage x micro-batch search with short timed
runs, started by ``deepshard --autotuning {tune,run}``. See docs/observability.md."""
