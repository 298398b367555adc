"""The command lines each runner builds, environment propagation and the launcher's decisions."""

import logging
import os
import shlex
import sys

import pytest

from deepshard.launcher import cli, launch
from deepshard.launcher.runners import (
    NodeOptions,
    RunnerArgs,
    collect_exports,
    local_plan,
    mpich_plan,
    openmpi_plan,
    pdsh_plan,
    read_env_file,
    slurm_plan,
    ssh_plan,
)

PY = sys.executable
RES = {"w0": [0, 1], "w1": [0, 1]}


def opts(**overrides):
    base = dict(
        script="train.py",
        script_args=["--deepspeed_config", "ds config.json"],
        nnodes=2,
        master_addr="10.0.0.1",
        master_port=29500,
        job_id="deepshard-abc",
    )
    return NodeOptions(**{**base, **overrides})


def node_cmd(rank_flag, slots="0,1", extra=(), watch=False):
    cmd = [
        PY,
        "-u",
        "-m",
        "deepshard.launcher.node",
        "--nnodes=2",
        f"--nproc_per_node={len(slots.split(','))}",
        f"--slots={slots}",
        "--master_addr=10.0.0.1",
        "--master_port=29500",
        "--job_id=deepshard-abc",
        "--max_restarts=0",
        *rank_flag,
        *extra,
    ]
    if watch:
        cmd.append("--watch_stdin")
    return [*cmd, "--", "train.py", "--deepspeed_config", "ds config.json"]


def remote(node, exports=""):
    return f"{exports}cd {shlex.quote(os.getcwd())}; {shlex.join(node)}"


def test_node_argv_flags():
    o = opts(module=True, no_local_rank=True, bind_cores_to_rank=True, bind_core_list="0-3", log_dir="logs")
    cmd = o.argv("1", [2, 3], rdzv=False, watch_stdin=True)
    assert cmd == node_cmd(
        ["--node_rank=1"],
        "2,3",
        [
            "--module",
            "--no_local_rank",
            "--bind_cores_to_rank",
            f"--log_dir={os.path.abspath('logs')}",
            "--bind_core_list=0-3",
        ],
        watch=True,
    )


def test_local_plan():
    plan = local_plan(opts(nnodes=1), [0, 1, 2], 0, {"A": "1"})
    assert plan.stdin_pipe and plan.kill_command is None and plan.env == {"A": "1"}
    assert plan.commands == [
        [c.replace("--nnodes=2", "--nnodes=1") for c in node_cmd(["--node_rank=0"], "0,1,2", watch=True)]
    ]


def test_ssh_plan_one_ssh_per_host_with_exports():
    plan = ssh_plan(
        opts(),
        {"w0": [0, 1], "w1": [1]},
        {"NCCL_DEBUG": "INFO", "X": "a b"},
        {},
        RunnerArgs(launcher_args="-i key", ssh_port=2222),
    )
    exports = "export NCCL_DEBUG=INFO; export X='a b'; "
    assert plan.labels == ["w0", "w1"] and plan.stdin_pipe
    assert plan.commands == [
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-p",
            "2222",
            "-i",
            "key",
            "w0",
            remote(node_cmd(["--node_rank=0"], watch=True), exports),
        ],
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-p",
            "2222",
            "-i",
            "key",
            "w1",
            remote(node_cmd(["--node_rank=1"], "1", watch=True), exports),
        ],
    ]


def test_pdsh_plan_matches_deepspeed_and_has_a_tagged_kill():
    plan = pdsh_plan(
        opts(), RES, {"PYTHONPATH": "/x"}, {"PDSH_SSH_ARGS_APPEND": "-q"}, RunnerArgs(ssh_port=2222)
    )
    pdsh = ["pdsh", "-S", "-f", "1024", "-w", "w0,w1"]
    assert plan.commands == [[*pdsh, remote(node_cmd(["--node_rank=%n"]), "export PYTHONPATH=/x; ")]]
    assert plan.env == {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": "-q -p 2222"}
    assert plan.kill_command == [*pdsh, "pkill -TERM -f -- '[-]-job_id=deepshard-abc'"]


def test_pdsh_refuses_uneven_hosts():
    with pytest.raises(ValueError, match="different slot counts"):
        pdsh_plan(opts(), {"w0": [0, 1], "w1": [0]}, {}, {}, RunnerArgs())


RDZV = ["--rdzv", "--min_nodes=-1"]


def test_slurm_plan():
    plan = slurm_plan(
        opts(), RES, {"NCCL_X": "1"}, {}, RunnerArgs("--partition=gpu", comment="c", account="acct")
    )
    assert plan.commands == [
        [
            "srun",
            "--nodes=2",
            "--ntasks=2",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            "--nodelist=w0,w1",
            "--comment=c",
            "--account=acct",
            "--export=ALL,NCCL_X=1",
            "--partition=gpu",
            *node_cmd(RDZV),
        ]
    ]


def test_openmpi_plan():
    plan = openmpi_plan(opts(), RES, {"NCCL_X": "1"}, {}, RunnerArgs("--mca btl tcp,self"))
    assert plan.commands == [
        [
            "mpirun",
            "--allow-run-as-root",
            "-np",
            "2",
            "--map-by",
            "ppr:1:node",
            "--bind-to",
            "none",
            "--host",
            "w0:1,w1:1",
            "-x",
            "NCCL_X=1",
            "--mca",
            "btl",
            "tcp,self",
            *node_cmd(RDZV),
        ]
    ]


def test_mpich_plan():
    plan = mpich_plan(opts(), RES, {"NCCL_X": "1"}, {}, RunnerArgs())
    assert plan.commands == [
        ["mpirun", "-n", "2", "-ppn", "1", "-hosts", "w0,w1", "-genv", "NCCL_X", "1", *node_cmd(RDZV)]
    ]


def test_rendezvous_runners_need_uniform_slots():
    with pytest.raises(ValueError, match="--launcher slurm starts one identical agent per node"):
        slurm_plan(opts(), {"w0": [0, 1], "w1": [1]}, {}, {}, RunnerArgs())


def test_exports_prefixes_and_env_files(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepshard_env").write_text("# comment\n\nB=cwd\nC= spaced value \n")
    env = {"NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/p", "UCX_TLS": "tcp", "HOME": "/root", "CUDA_HOME": "/c"}
    exports = collect_exports(env, [str(home), str(cwd)])
    assert exports == {
        "NCCL_IB_HCA": "mlx5",
        "PYTHONPATH": "/p",
        "UCX_TLS": "tcp",
        "A": "home",
        "B": "cwd",
        "C": "spaced value",
    }


def test_env_file_error_names_the_line(tmp_path):
    (tmp_path / "e").write_text("GOOD=1\nnot a line\n")
    with pytest.raises(ValueError, match=r"e:2: 'not a line' is not 'KEY=VALUE'"):
        read_env_file(str(tmp_path / "e"))


def plan_for(tmp_path, monkeypatch, *argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    args = launch.build_parser().parse_args(list(argv))
    return launch.build_plan(args, {"PATH": os.environ["PATH"]})


@pytest.fixture
def launcher_log():
    """Messages logged under deepshard.launcher (the project's logger does not propagate to caplog)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("deepshard.launcher")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def test_cpu_num_gpus_means_processes(tmp_path, monkeypatch, launcher_log):
    monkeypatch.setattr(launch, "accelerator_count", lambda: 0)
    monkeypatch.setattr(launch, "DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    plan = plan_for(tmp_path, monkeypatch, "--num_gpus", "3", "train.py", "--x")
    [cmd] = plan.commands
    assert (
        "--nproc_per_node=3" in cmd and "--master_addr=127.0.0.1" in cmd and cmd[-2:] == ["train.py", "--x"]
    )
    assert any("--num_gpus 3 starts 3 CPU processes" in m for m in launcher_log)


def test_hostfile_node_rank_runs_one_node_here(tmp_path, monkeypatch):
    (tmp_path / "hf").write_text("a slots=2\nb slots=3\n")
    plan = plan_for(
        tmp_path, monkeypatch, "-H", "hf", "--node_rank", "1", "--master_addr", "10.0.0.1", "train.py"
    )
    [cmd] = plan.commands
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=3", "--slots=0,1,2"} <= set(cmd)


def test_multi_node_uses_the_runner_and_prepends_cwd_to_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "hf").write_text("a slots=2\nb slots=2\n")
    monkeypatch.setattr("deepshard.launcher.runners.shutil.which", lambda name: "/usr/bin/" + name)
    plan = plan_for(
        tmp_path, monkeypatch, "-H", "hf", "--launcher", "SLURM", "--master_addr", "a", "train.py"
    )
    assert plan.commands[0][0] == "srun"
    assert f"PYTHONPATH={tmp_path}" in plan.commands[0][6]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.py"], "training script 'missing.py' does not exist"),
        (["-H", "hf", "-i", "zz", "train.py"], "host 'zz' is not in the hostfile"),
        (["-H", "hf", "-i", "a:5", "train.py"], "slot 5 is out of range for host 'a'"),
        (["-H", "nofile", "train.py"], "--hostfile 'nofile' does not exist"),
        (["-H", "hf", "--node_rank", "2", "--master_addr", "x", "train.py"], "--node_rank 2 is out of range"),
        (["-H", "hf", "--node_rank", "0", "train.py"], "pass --master_addr"),
        (["-H", "hf", "--launcher", "mpich", "--master_addr", "a", "train.py"], "needs 'mpirun' on PATH"),
        (["--num_nodes", "2", "train.py"], "needs a hostfile"),
        (["--elastic_training", "train.py"], "--elastic_training needs --master_addr"),
        (["--no_python", "no-such-program-xyz"], "is not an executable on PATH"),
    ],
)
def test_bad_input_is_one_line_naming_the_value(tmp_path, monkeypatch, argv, message):
    (tmp_path / "hf").write_text("a slots=2\nb slots=2\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no mpirun
    monkeypatch.setattr(launch, "DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=message) as info:
        plan_for(tmp_path, monkeypatch, *argv)
    assert "\n" not in str(info.value)


def test_cli_reports_errors_without_traceback(tmp_path, monkeypatch, launcher_log):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["missing.py"]) == 2
    assert any(m.startswith("error: training script 'missing.py' does not exist") for m in launcher_log)


def test_cli_dispatches_subcommands(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.SUBCOMMANDS, "report", "deepshard.launcher.report:main")
    monkeypatch.setattr("deepshard.launcher.report.main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["report", "--json"]) == 0
    assert seen == [["--json"]]


def test_elastic_uses_c10d_rendezvous_with_min_and_max_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    plan = plan_for(
        tmp_path,
        monkeypatch,
        "--elastic_training",
        "--master_addr",
        "10.0.0.1",
        "--max_elastic_nodes",
        "3",
        "--min_elastic_nodes",
        "2",
        "train.py",
    )
    [cmd] = plan.commands
    assert {"--rdzv", "--min_nodes=2", "--nnodes=3"} <= set(cmd)
    assert not any(c.startswith("--node_rank") for c in cmd)


def test_node_torchrun_argv():
    from deepshard.launcher import node

    args = node.build_parser().parse_args(
        [
            "--nnodes=2",
            "--nproc_per_node=2",
            "--rdzv",
            "--min_nodes=1",
            "--master_addr=h",
            "--job_id=j",
            "--no_local_rank",
            "--",
            "train.py",
            "--x",
        ]
    )
    argv = node.torchrun_argv(args, [0, 1], "/logs", tee=True)
    assert argv[:4] == ["--nnodes=1:2", "--rdzv_backend=c10d", "--rdzv_endpoint=h:29500", "--rdzv_id=j"]
    assert {"--nproc_per_node=2", "--log_dir=/logs", "--tee=3", "--no_python"} <= set(argv)
    shim = argv[argv.index("--no_python") + 1 :]
    assert shim[:2] == [sys.executable, "-u"] and shim[2].endswith("deepshard/launcher/rank.py")
    assert shim[4:] == ["--no_local_rank", "--", "train.py", "--x"]


def test_rank_program_and_core_share():
    from deepshard.launcher import rank

    assert rank.program("t.py", ["--a"], 1, module=False, no_python=False, no_local_rank=False) == [
        sys.executable,
        "-u",
        "t.py",
        "--local_rank=1",
        "--a",
    ]
    assert rank.program("pkg.mod", [], 0, module=True, no_python=False, no_local_rank=True) == [
        sys.executable,
        "-u",
        "-m",
        "pkg.mod",
    ]
    assert rank.program("./bin", ["x"], 2, module=False, no_python=True, no_local_rank=False) == [
        "./bin",
        "--local_rank=2",
        "x",
    ]
    assert rank.core_share([0, 1, 2, 3, 4], 1, 2) == [2, 3]
    with pytest.raises(ValueError, match="cannot bind 3 ranks to 2 cores"):
        rank.core_share([0, 1], 0, 3)
