"""Rank discovery from torchrun, MPI and SLURM environments (``deepshard.comm.discovery``)."""

from __future__ import annotations

import os
import sys

import pytest

from deepshard.comm import discovery
from deepshard.comm.discovery import (
    RankInfo,
    discover,
    expand_slurm_nodelist,
    export_torch_env,
    has_torch_env,
)

TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_torch_env(monkeypatch):
    """Remove torchrun's variables; anything the test sets is removed again afterwards."""
    for key in TORCH_KEYS:
        monkeypatch.setenv(key, "")  # records the original state so that teardown restores it
        monkeypatch.delenv(key)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # no mpi4py: the address cannot be broadcast
    return monkeypatch


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0"}
    assert discover(env) == RankInfo(3, 8, 1, 2, "node0", "env")


def test_torchrun_env_defaults():
    info = discover({"RANK": "0", "WORLD_SIZE": "2"})
    assert (info.local_rank, info.local_world_size, info.master_addr, info.source) == (0, 2, None, "env")


def test_torchrun_env_takes_precedence_over_mpi_and_slurm():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "6",
        "SLURM_PROCID": "4",
        "SLURM_NTASKS": "7",
    }
    info = discover(env)
    assert (info.rank, info.world_size, info.source) == (1, 2, "env")


def test_openmpi_env():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    assert discover(env) == RankInfo(5, 8, 1, 4, None, "mpi")


def test_mpich_intel_env():
    env = {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "MASTER_ADDR": "h0",
    }
    assert discover(env) == RankInfo(2, 4, 0, 2, "h0", "mpi")


def test_pmix_env():
    env = {"PMIX_RANK": "3", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "3", "PMIX_LOCAL_SIZE": "4"}
    assert discover(env) == RankInfo(3, 4, 3, 4, None, "mpi")


def test_openmpi_takes_precedence_over_slurm():
    # mpirun inside an salloc allocation: both sets exist; MPI's describe the job that was launched
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert discover(env).source == "mpi"


def test_slurm_env():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    }
    assert discover(env) == RankInfo(5, 8, 1, 2, "gpu01", "slurm")


def test_slurm_env_master_addr_wins_and_old_nodelist_name():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a,b", "MASTER_ADDR": "10.0.0.9"}
    info = discover(env)
    assert info.master_addr == "10.0.0.9"
    info = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "b1,a1"})
    assert info.master_addr == "b1" and info.local_world_size == 1


def test_single_process():
    assert discover({}) == RankInfo(0, 1, 0, 1, None, "single")


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("node1", ["node1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("gpu[1-2]-ib,cpu[3]", ["gpu1-ib", "gpu2-ib", "cpu3"]),
        ("x[1,3],y[2-3]", ["x1", "x3", "y2", "y3"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_expand_slurm_nodelist_two_ranges_in_one_name():
    # SLURM hostlists may hold several bracket ranges in one name (rack x node): a cartesian product.
    assert expand_slurm_nodelist("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]


def test_export_torch_env_writes_missing_variables(clean_torch_env):
    export_torch_env(RankInfo(3, 4, 1, 2, "host0", "slurm"), port=12345)
    assert {k: os.environ[k] for k in TORCH_KEYS} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "host0",
        "MASTER_PORT": "12345",
    }
    assert has_torch_env()


def test_export_torch_env_keeps_existing_variables(clean_torch_env):
    clean_torch_env.setenv("MASTER_PORT", "2222")
    export_torch_env(RankInfo(0, 2, 0, 2, "h", "mpi"), port=1111)
    assert os.environ["MASTER_PORT"] == "2222"


def test_export_torch_env_single_node_mpi_uses_loopback(clean_torch_env):
    export_torch_env(RankInfo(1, 4, 1, 4, None, "mpi"), port=29500)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_export_torch_env_multi_node_mpi_without_master_addr(clean_torch_env):
    with pytest.raises(ValueError) as info:
        export_torch_env(RankInfo(5, 8, 1, 4, None, "mpi"), port=29500)
    message = str(info.value)
    assert "8-rank mpi job" in message and "several nodes" in message
    assert "set MASTER_ADDR" in message and "mpi4py" in message
    assert "RANK" not in os.environ  # nothing half-written


def test_has_torch_env():
    assert has_torch_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert not has_torch_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x"})


def test_mpi_master_addr_without_mpi4py(clean_torch_env):
    assert discovery._mpi_master_addr() is None


def test_group_created_by_init_distributed_is_destroyed_at_exit(tmp_path):
    # DeepSpeed scripts end without destroy_process_group(); on gloo a rank that exits while its peers
    # still work can abort in gloo's teardown (exit -6). init_distributed's group is destroyed at exit.
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "import atexit, torch.distributed as dist, deepshard.comm as comm\n"
        "comm.init_distributed(dist_backend='gloo', verbose=False)\n"
        "assert dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('initialized after exit hooks:', dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in TORCH_KEYS}
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "initialized after exit hooks: False" in done.stdout
