"""Hostfile parsing and --include/--exclude/--num_nodes/--num_gpus filtering (no processes)."""

import pytest

from deepshard.launcher.hostfile import filter_resources, parse_hostfile, read_hostfile, select_resources

HOSTFILE = """
# a comment line
worker-0 slots=4
worker-1   slots=4   # trailing comment
worker-2 slots=2
"""
POOL = {"worker-0": 4, "worker-1": 4, "worker-2": 2}


def test_parse_keeps_order_and_skips_comments():
    pool = parse_hostfile(HOSTFILE.splitlines())
    assert pool == POOL
    assert list(pool) == ["worker-0", "worker-1", "worker-2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker-0 slots=4\nworker-0 slots=2\n", "listed twice"),
        ("worker-0 slot=4\n", "malformed hostfile line 'worker-0 slot=4'"),
        ("worker-0\n", "malformed"),
        ("worker-0 slots=0\n", "at least slots=1"),
        ("# only a comment\n\n", "lists no hosts"),
    ],
)
def test_parse_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_hostfile(text.splitlines(), source="hf")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("hf")


def test_missing_default_hostfile_means_local_but_explicit_one_is_an_error(tmp_path):
    assert read_hostfile(str(tmp_path / "nope"), explicit=False) is None
    with pytest.raises(ValueError, match="does not exist"):
        read_hostfile(str(tmp_path / "nope"), explicit=True)
    (tmp_path / "hf").write_text(HOSTFILE)
    assert read_hostfile(str(tmp_path / "hf"), explicit=True) == POOL


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}),
        ({"include": "worker-1"}, {"worker-1": [0, 1, 2, 3]}),
        ({"include": "worker-2@worker-0:0,2"}, {"worker-0": [0, 2], "worker-2": [0, 1]}),
        ({"include": "worker-0:3,1@worker-0:1"}, {"worker-0": [1, 3]}),
        ({"exclude": "worker-1"}, {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1]}),
        ({"exclude": "worker-0:0@worker-2:0,1"}, {"worker-0": [1, 2, 3], "worker-1": [0, 1, 2, 3]}),
        ({"num_nodes": 2}, {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]}),
        ({"num_slots": 1}, {"worker-0": [0], "worker-1": [0], "worker-2": [0]}),
        ({"num_nodes": 1, "num_slots": 2}, {"worker-0": [0, 1]}),
    ],
)
def test_select_resources(kwargs, expected):
    resources = select_resources(POOL, **kwargs)
    assert resources == expected
    assert list(resources) == list(expected)  # node-rank order is hostfile order


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "worker-9"}, "host 'worker-9' is not in the hostfile"),
        ({"exclude": "worker-0:7"}, "slot 7 is out of range for host 'worker-0'"),
        ({"include": "worker-0:a"}, "not integers"),
        ({"include": "worker-0", "exclude": "worker-1"}, "mutually exclusive"),
        ({"include": "worker-0", "num_slots": 2}, "cannot be combined"),
        ({"num_nodes": 5}, "--num_nodes 5 asks for more hosts"),
        ({"exclude": "worker-0@worker-1@worker-2"}, "left no slots"),
    ],
)
def test_select_resources_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        select_resources(POOL, **kwargs)
    assert "\n" not in str(info.value)


def test_filter_without_flags_is_a_copy():
    pool = {"a": [0, 1]}
    result = filter_resources(pool)
    result["a"].append(2)
    assert pool == {"a": [0, 1]}
