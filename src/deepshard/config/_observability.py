"""Config sections that make a run visible: monitors, the flops profiler and the comms logger.

Keys and defaults are DeepSpeed 0.19.8's: ``deepspeed/monitor/config.py`` (``tensorboard``, ``wandb``,
``csv_monitor``, ``comet``), ``deepspeed/profiling/constants.py`` (``flops_profiler``) and
``deepspeed/comm/constants.py`` (``comms_logger``). The mechanisms live in :mod:`deepshard.monitor` and
:mod:`deepshard.profiling`; this module only describes what the user asked for.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from deepshard.config._types import Float, Int, StrictModel, Unsupported, equals, unsupported


class _FilesConfig(StrictModel):
    """The place of a file-writing monitor: ``output_path/job_name/``."""

    output_path: str = Field(
        default="",
        description='Directory of the files; `""` is the current working directory. '
        "Files go to `output_path/job_name/`.",
    )
    job_name: str = Field(
        default="DeepSpeedJobName", description="Sub-directory of `output_path` for this job."
    )


class TensorBoardConfig(_FilesConfig):
    """``tensorboard``: scalar events written with ``torch.utils.tensorboard`` (needs the `tensorboard` package)."""

    enabled: bool = Field(default=False, description="Write TensorBoard event files on global rank 0.")


class WandbConfig(StrictModel):
    """``wandb``: metrics logged to Weights & Biases (needs the `wandb` package)."""

    enabled: bool = Field(default=False, description="Log to Weights & Biases from global rank 0.")
    group: str | None = Field(default=None, description="W&B group of the run.")
    team: str | None = Field(default=None, description="W&B team (entity).")
    project: str = Field(default="deepspeed", description="W&B project.")


class CSVConfig(_FilesConfig):
    """``csv_monitor``: one CSV file per metric, `step,<metric>` rows, named
    `output_path/job_name/<metric name with / replaced by _>.csv` (DeepSpeed's layout)."""

    enabled: bool = Field(default=False, description="Write CSV files on global rank 0.")


class CometConfig(StrictModel):
    """``comet``: metrics logged to a Comet experiment (needs the `comet_ml` package)."""

    enabled: bool = Field(default=False, description="Log to Comet from global rank 0.")
    samples_log_interval: Int = Field(
        default=100, gt=0, description="Log a metric again only after this many more training samples."
    )
    project: str | None = Field(default=None, description="Comet project (else `COMET_PROJECT_NAME`).")
    workspace: str | None = Field(default=None, description="Comet workspace (else `COMET_WORKSPACE`).")
    api_key: str | None = Field(default=None, description="Comet API key (else `COMET_API_KEY`).")
    experiment_name: str | None = Field(default=None, description="Name given to the experiment.")
    experiment_key: str | None = Field(default=None, description="Key of an experiment to log to.")
    online: bool | None = Field(default=None, description="Log to the server (`true`) or offline.")
    mode: str | None = Field(
        default=None, description="`get`, `create` or `get_or_create` (Comet's default)."
    )


class FlopsProfilerConfig(StrictModel):
    """``flops_profiler``: profile one training step's forward per module and print the table on rank 0."""

    enabled: bool = Field(default=False, description="Profile the forward of step `profile_step`.")
    recompute_fwd_factor: Float = Field(
        default=0.0,
        ge=0.0,
        description="Fraction of the forward recomputed in backward (activation checkpointing: `1.0`); "
        "backward flops are counted as `(2 + recompute_fwd_factor)` x forward flops.",
    )
    profile_step: Int = Field(
        default=1, ge=0, description="The global step (0-based) whose forward is profiled."
    )
    module_depth: Int = Field(
        default=-1, description="Depth of the aggregated per-module table; `-1` is the innermost modules."
    )
    top_modules: Int = Field(default=1, gt=0, description="Modules listed per depth in the aggregated table.")
    detailed: bool = Field(default=True, description="Also print the model tree with each module's profile.")
    output_file: str | None = Field(
        default=None, description="Write the profile to this file instead of the log."
    )


class CommsLoggerConfig(StrictModel):
    """``comms_logger``: count, size, latency and bandwidth of every collective through `deepshard.comm`."""

    enabled: bool = Field(
        default=False,
        description="Record collectives (each recorded collective is waited for, as in DeepSpeed, so "
        "logging serialises communication with compute).",
    )
    prof_all: bool = Field(default=True, description="Record every collective, not only those in `prof_ops`.")
    prof_ops: list[str] = Field(
        default_factory=list,
        description='Collective names to record when `prof_all` is false, e.g. `["all_reduce"]`.',
    )
    verbose: bool = Field(default=False, description="Log each collective as it completes (rank 0).")
    debug: bool = Field(default=False, description="Record under `<op> | [caller: <function>]` names.")


class AutotuningConfig(StrictModel):
    """``autotuning``: the search ``deepshard --autotuning {tune,run}`` runs (DeepSpeed 0.19.8's keys).

    deepshard searches ZeRO stage x micro-batch with short timed runs; the other tuner knobs of
    DeepSpeed are accepted at their defaults only (see `NOT_SUPPORTED`).
    """

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "tuner_type": unsupported("the model-based and random tuners", equals("gridsearch")),
        "mp_size": unsupported("model-parallel size of the tuned job", equals(1)),
        "model_info": unsupported("model facts given to the tuner", equals(None)),
        "model_info_path": unsupported("a file of model facts for the tuner", equals(None)),
        "arg_mappings": unsupported(
            "mapping of config keys to the script's command-line flags", equals(None)
        ),
        "max_train_batch_size": unsupported("a bound on the global batch size", equals(None)),
        "min_train_batch_size": unsupported("a bound on the global batch size", equals(1)),
    }

    enabled: bool = Field(default=False, description="Whether the autotuner may run this config.")
    fast: bool = Field(default=True, description="Accepted; deepshard's search is always the short one.")
    results_dir: str = Field(
        default="autotuning_results", description="Where the results table and best config go."
    )
    exps_dir: str = Field(
        default="autotuning_exps", description="Where each experiment's config and metrics go."
    )
    overwrite: bool = Field(default=True, description="Run an experiment again even if its metrics exist.")
    start_profile_step: Int = Field(default=3, ge=0, description="First optimizer step of the timed window.")
    end_profile_step: Int = Field(
        default=5, gt=0, description="Last optimizer step of the window; the run stops after it."
    )
    metric: Literal["throughput", "latency"] = Field(
        default="throughput", description="What is optimised: samples/s (higher) or step latency (lower)."
    )
    metric_path: str | None = Field(
        default=None, description="Where a run writes its metrics (set by the tuner)."
    )
    tuner_early_stopping: Int = Field(
        default=5, gt=0, description="Stop a stage's search after this many experiments without improvement."
    )
    tuner_num_trials: Int = Field(default=50, gt=0, description="At most this many experiments in all.")
    max_train_micro_batch_size_per_gpu: Int = Field(
        default=1024, gt=0, description="Largest micro-batch tried."
    )
    min_train_micro_batch_size_per_gpu: Int = Field(
        default=1, gt=0, description="Smallest micro-batch tried."
    )
    num_tuning_micro_batch_sizes: Int = Field(
        default=3, gt=0, description="Micro-batch sizes tried per stage (doubling from the smallest)."
    )
