"""Real launches: processes, rendezvous over gloo, failures, Ctrl-C and the orphan check.

Each job's processes carry a unique ``--tag`` on their command line; after the launcher returns, no
process on the machine may still carry it. Two-node runs use two network namespaces joined by a veth
pair when this machine allows it (root + iproute2), otherwise two agents on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("rank_probe.py")
LAUNCHER = [sys.executable, "-m", "deepshard.launcher"]

pytestmark = pytest.mark.timeout(90)

# A test double for ssh: "running on a host" is running in that host's network namespace (or here).
FAKE_SSH = r"""#!/bin/bash
while [[ $1 == -* ]]; do case $1 in -o|-p|-i) shift 2;; *) shift;; esac; done
host=$1; shift
ns_var="FAKE_SSH_NS_${host//[.-]/_}"
if [[ -n ${!ns_var} ]]; then exec ip netns exec "${!ns_var}" bash -c "$*"; fi
exec bash -c "$*"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tagged_processes(tag: str) -> list[str]:
    """Command lines of live processes that mention ``tag`` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def assert_no_leftovers(tag: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged_processes(tag) == []


def records(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


@dataclass
class Job:
    """One probe job: its output folder and tag, and the launcher command around it."""

    tmp: Path
    tag: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:10]}")

    def __post_init__(self) -> None:
        self.out = self.tmp / f"out-{self.tag}"
        self.out.mkdir()

    def argv(self, *launcher_flags: str, fail_rank: int = -1, sleep: float = 0.0) -> list[str]:
        return [
            *LAUNCHER,
            *launcher_flags,
            str(PROBE),
            "--out",
            str(self.out),
            "--tag",
            self.tag,
            "--fail_rank",
            str(fail_rank),
            "--sleep",
            str(sleep),
        ]


@dataclass
class HostPair:
    """Two "hosts" for multi-node runs: their addresses and how to run a command on each."""

    hosts: list[str]
    prefixes: list[list[str]]  # prepend to run a command "on" host i
    env: dict[str, str]
    namespaces: dict[str, str]  # host -> netns name (empty on loopback)


def _netns_pair() -> tuple[HostPair | None, str]:
    if shutil.which("ip") is None:
        return None, "iproute2 ('ip') is not installed"
    suffix = uuid.uuid4().hex[:6]
    names = [f"dsa{suffix}", f"dsb{suffix}"]
    hosts = ["10.213.7.1", "10.213.7.2"]
    steps = [
        ["ip", "netns", "add", names[0]],
        ["ip", "netns", "add", names[1]],
        [
            "ip",
            "link",
            "add",
            "ds0",
            "netns",
            names[0],
            "type",
            "veth",
            "peer",
            "name",
            "ds0",
            "netns",
            names[1],
        ],
    ]
    for name, host in zip(names, hosts):
        steps += [
            ["ip", "-n", name, "addr", "add", f"{host}/24", "dev", "ds0"],
            ["ip", "-n", name, "link", "set", "ds0", "up"],
            ["ip", "-n", name, "link", "set", "lo", "up"],
        ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            _delete_netns(names)
            return None, f"cannot create network namespaces ('{' '.join(step)}': {result.stderr.strip()})"
    pair = HostPair(
        hosts,
        [["ip", "netns", "exec", n] for n in names],
        {"GLOO_SOCKET_IFNAME": "ds0"},
        dict(zip(hosts, names)),
    )
    return pair, ""


def _delete_netns(names: list[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def netns_result():
    pair, reason = _netns_pair()
    yield pair, reason
    if pair is not None:
        _delete_netns(list(pair.namespaces.values()))


@pytest.fixture
def two_hosts(netns_result) -> HostPair:
    """Two network namespaces if possible, else two names for this machine on loopback."""
    pair, _ = netns_result
    if pair is not None:
        return pair
    return HostPair(["127.0.0.1", "localhost"], [[], []], {"GLOO_SOCKET_IFNAME": "lo"}, {})


@pytest.fixture
def fake_ssh_env(tmp_path, two_hosts) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for host, ns in two_hosts.namespaces.items():
        env["FAKE_SSH_NS_" + host.replace(".", "_").replace("-", "_")] = ns
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    start = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def test_network_namespaces_available(netns_result):
    pair, reason = netns_result
    if pair is None:
        pytest.skip(f"two-node tests run on loopback instead: {reason}")


def test_local_launch_of_two_processes(tmp_path):
    job = Job(tmp_path)
    port = free_port()
    result, _ = run(job.argv("--num_procs", "2", "--master_port", str(port)), tmp_path)
    assert result.returncode == 0, result.stderr
    seen = records(job.out)
    assert sorted(seen) == [0, 1]
    cores = len(os.sched_getaffinity(0))
    for rank, rec in seen.items():
        assert rec["RANK"] == str(rank) and rec["LOCAL_RANK"] == str(rank)
        assert rec["argv_local_rank"] == rank
        assert (rec["WORLD_SIZE"], rec["LOCAL_WORLD_SIZE"]) == ("2", "2")
        assert (rec["MASTER_ADDR"], rec["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert rec["allreduce"] == 3.0
        if "OMP_NUM_THREADS" not in os.environ:
            assert rec["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert_no_leftovers(job.tag)


def test_failing_rank_stops_the_job(tmp_path):
    job = Job(tmp_path)
    result, elapsed = run(
        job.argv("--num_procs", "2", "--master_port", str(free_port()), fail_rank=1, sleep=120), tmp_path
    )
    assert result.returncode == 3
    assert elapsed < 30
    assert "rank 1 (local rank 1 on node 0) failed with exit code 3" in result.stderr
    assert "rank 1: failing on purpose" in result.stderr.split("failed with exit code 3")[1]
    assert_no_leftovers(job.tag)


def test_ctrl_c_ends_the_whole_tree(tmp_path):
    """Also: --no_local_rank, a thread count the user set, and --bind_cores_to_rank."""
    job = Job(tmp_path)
    proc = subprocess.Popen(
        job.argv(
            "--num_procs",
            "2",
            "--no_local_rank",
            "--bind_cores_to_rank",
            "--master_port",
            str(free_port()),
            sleep=120,
        ),
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "7"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(records(job.out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = records(job.out)
    assert len(seen) == 2
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert_no_leftovers(job.tag)
    assert [r["argv_local_rank"] for r in seen.values()] == [None, None]
    assert [r["OMP_NUM_THREADS"] for r in seen.values()] == ["7", "7"]
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // 2
    assert [r["affinity"] for r in seen.values()] == [cores[:share], cores[share : 2 * share]]


def test_two_nodes_through_the_ssh_runner(tmp_path, two_hosts, fake_ssh_env):
    job = Job(tmp_path)
    (tmp_path / "hostfile").write_text("".join(f"{h} slots=2\n" for h in two_hosts.hosts))
    env_lines = [f"{k}={v}" for k, v in two_hosts.env.items()]
    (tmp_path / ".deepshard_env").write_text("\n".join([*env_lines, "DEEPSHARD_TEST_EXPORT=from-env-file"]))
    port = free_port()
    result, _ = run(
        job.argv(
            "-H",
            "hostfile",
            "--launcher",
            "ssh",
            "--master_addr",
            two_hosts.hosts[0],
            "--master_port",
            str(port),
        ),
        tmp_path,
        fake_ssh_env,
    )
    assert result.returncode == 0, result.stderr
    seen = records(job.out)
    assert sorted(seen) == [0, 1, 2, 3]
    assert {r["allreduce"] for r in seen.values()} == {10.0}
    assert [r["LOCAL_RANK"] for r in seen.values()] == ["0", "1", "0", "1"]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["MASTER_ADDR"]) for r in seen.values()} == {
        ("4", "2", two_hosts.hosts[0])
    }
    assert {r["DEEPSHARD_TEST_EXPORT"] for r in seen.values()} == {"from-env-file"}
    assert_no_leftovers(job.tag)


def test_failure_on_one_node_stops_the_other(tmp_path, two_hosts, fake_ssh_env):
    job = Job(tmp_path)
    (tmp_path / "hostfile").write_text("".join(f"{h} slots=2\n" for h in two_hosts.hosts))
    (tmp_path / ".deepshard_env").write_text("".join(f"{k}={v}\n" for k, v in two_hosts.env.items()))
    result, elapsed = run(
        job.argv(
            "-H",
            "hostfile",
            "--launcher",
            "ssh",
            "--master_addr",
            two_hosts.hosts[0],
            "--master_port",
            str(free_port()),
            fail_rank=3,
            sleep=120,
        ),
        tmp_path,
        fake_ssh_env,
    )
    assert result.returncode == 3, result.stderr
    assert elapsed < 45
    assert f"{two_hosts.hosts[1]} exited with code 3: stopping the rest of the job" in result.stderr
    assert_no_leftovers(job.tag)


def test_two_nodes_with_one_launcher_per_node(tmp_path, two_hosts):
    job = Job(tmp_path)
    (tmp_path / "hostfile").write_text("".join(f"{h} slots=2\n" for h in two_hosts.hosts))
    port = str(free_port())
    env = {**os.environ, **two_hosts.env}
    procs = [
        subprocess.Popen(
            [
                *prefix,
                *job.argv(
                    "-H",
                    "hostfile",
                    "--node_rank",
                    str(rank),
                    "--master_addr",
                    two_hosts.hosts[0],
                    "--master_port",
                    port,
                ),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, prefix in enumerate(two_hosts.prefixes)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    seen = records(job.out)
    assert sorted(seen) == [0, 1, 2, 3] and {r["allreduce"] for r in seen.values()} == {10.0}
    assert_no_leftovers(job.tag)
