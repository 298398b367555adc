"""``deepshard report``: table and JSON output, and the direct-IO probe."""

import json
import subprocess
import sys

from deepshard.launcher import report


def test_report_json_through_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deepshard.launcher", "report", "--json", "--path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"versions", "accelerator", "backends", "cpu", "memory", "disk", "matmul_gflops", "direct_io"}
    mm = data["matmul_gflops"]
    assert mm["size"] == report.MATMUL_SIZE and mm["threads"] >= 1
    assert set(mm["cpu"]) == {"fp32", "bf16", "fp16"}
    assert all(isinstance(v, float) and v > 0 for v in mm["cpu"].values()), mm
    assert data["versions"]["torch"] and data["versions"]["deepshard"]
    assert data["backends"]["gloo"] is True
    assert data["disk"]["path"] == str(tmp_path) and data["disk"]["free_gib"] > 0
    assert data["direct_io"]["path"] == str(tmp_path)
    table = report.format_table(data)
    for label in (
        "torch version",
        "accelerator",
        "backend nccl",
        "cpu cores",
        "memory",
        f"direct IO at {tmp_path}",
        "cpu matmul fp32",
        "cpu matmul bf16",
        "cpu matmul fp16",
    ):
        assert label in table


def test_direct_io_probe_cleans_up_and_explains(tmp_path):
    works, detail = report.probe_direct_io(str(tmp_path))
    assert isinstance(works, bool) and detail
    assert list(tmp_path.iterdir()) == []
    works, detail = report.probe_direct_io(str(tmp_path / "missing"))
    assert not works and "cannot create a file" in detail
