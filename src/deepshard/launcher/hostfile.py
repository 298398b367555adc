"""DeepSpeed's hostfile and ``--include``/``--exclude`` syntax, resolved into a resource map.

A hostfile lists one host per line in MPI style, ``worker-0 slots=4``; ``#`` starts a comment. The
resource map that everything downstream uses is an ordered ``{host: [slot, ...]}``: the order of the
hostfile is the order of node ranks, and the slots of a host are the accelerator indices (or, on a
CPU-only machine, just the local process count) used there.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

logger = logging.getLogger(__name__)

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default (DLTS_HOSTFILE)

ResourceMap = dict[str, list[int]]

_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*$")


def parse_hostfile(lines: Iterable[str], source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile lines into an ordered ``{host: slot_count}``.

    Raises ``ValueError`` naming the line for a malformed entry, a duplicated host, a zero slot count
    or a file without any host.
    """
    pool: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: malformed hostfile line {raw.strip()!r}; "
                "write one host per line as 'HOSTNAME slots=N', e.g. 'worker-0 slots=4'."
            )
        host, slots = match["host"], int(match["slots"])
        if host in pool:
            raise ValueError(
                f"{source}:{number}: host {host!r} is listed twice; keep one line per host "
                "and put all its slots on it."
            )
        if slots < 1:
            raise ValueError(f"{source}:{number}: host {host!r} has slots={slots}; give it at least slots=1.")
        pool[host] = slots
    if not pool:
        raise ValueError(f"{source}: the hostfile lists no hosts; add lines like 'worker-0 slots=4'.")
    return pool


def read_hostfile(path: str, explicit: bool) -> dict[str, int] | None:
    """Read the hostfile at ``path``; ``None`` when it does not exist.

    A missing default hostfile means a local run (DeepSpeed's behaviour). A missing hostfile that the
    user named with ``--hostfile`` is an error, since silently running locally would hide the typo.
    """
    if not os.path.isfile(path):
        if explicit:
            raise ValueError(
                f"--hostfile {path!r} does not exist; pass the path of an existing hostfile, "
                "or leave --hostfile out to run on this machine only."
            )
        logger.info("no hostfile at %s: running on this machine only", path)
        return None
    with open(path, encoding="utf-8") as handle:
        return parse_hostfile(handle, source=path)


def parse_node_specs(spec: str, flag: str) -> dict[str, list[int]]:
    """Parse ``host[:slot,slot]@host...`` into ``{host: [slots]}`` (an empty list means all slots)."""
    nodes: dict[str, list[int]] = {}
    for part in spec.split("@"):
        host, sep, slot_text = part.partition(":")
        if not host:
            raise ValueError(
                f"{flag} {spec!r}: empty host name in {part!r}; the format is 'host[:slot,slot]@host...'."
            )
        slots: list[int] = []
        if sep:
            try:
                slots = [int(s) for s in slot_text.split(",")]
            except ValueError:
                raise ValueError(
                    f"{flag} {spec!r}: slots {slot_text!r} of host {host!r} are not integers; "
                    "write them as 'host:0,1'."
                ) from None
        merged = nodes.setdefault(host, [])
        merged.extend(s for s in slots if s not in merged)
        if sep and not slots:
            raise ValueError(f"{flag} {spec!r}: host {host!r} has ':' but no slots after it.")
    return {host: sorted(slots) for host, slots in nodes.items()}


def _check_known(spec_nodes: dict[str, list[int]], pool: ResourceMap, flag: str, spec: str) -> None:
    for host, slots in spec_nodes.items():
        if host not in pool:
            raise ValueError(
                f"{flag} {spec!r}: host {host!r} is not in the hostfile (hosts: {', '.join(pool)}); "
                "use one of those names or add the host to the hostfile."
            )
        for slot in slots:
            if slot not in pool[host]:
                raise ValueError(
                    f"{flag} {spec!r}: slot {slot} is out of range for host {host!r}, which has slots "
                    f"{pool[host]}; pick slots from that list or raise 'slots=' in the hostfile."
                )


def filter_resources(pool: ResourceMap, include: str = "", exclude: str = "") -> ResourceMap:
    """Apply ``--include`` or ``--exclude`` to a resource map, keeping hostfile order.

    Hosts left without slots are dropped. The two flags are mutually exclusive, as in DeepSpeed.
    """
    if include and exclude:
        raise ValueError("--include and --exclude are mutually exclusive; pass only one of them.")
    if include:
        wanted = parse_node_specs(include, "--include")
        _check_known(wanted, pool, "--include", include)
        result = {h: (wanted[h] or list(pool[h])) for h in pool if h in wanted}
    elif exclude:
        dropped = parse_node_specs(exclude, "--exclude")
        _check_known(dropped, pool, "--exclude", exclude)
        result = {}
        for host, slots in pool.items():
            if host in dropped:
                slots = [s for s in slots if dropped[host] and s not in dropped[host]]
            result[host] = list(slots)
    else:
        result = {h: list(s) for h, s in pool.items()}
    result = {h: s for h, s in result.items() if s}
    if not result:
        raise ValueError(
            f"--include/--exclude ({include or exclude!r}) left no slots to run on; keep at least one."
        )
    return result


def select_resources(
    pool: dict[str, int],
    include: str = "",
    exclude: str = "",
    num_nodes: int = -1,
    num_slots: int = -1,
) -> ResourceMap:
    """Resolve a hostfile pool and the launcher flags into the resource map of the job.

    ``num_nodes`` keeps the first N hosts; ``num_slots`` (``--num_gpus``/``--num_procs``) uses slots
    ``[0, N)`` on every host. Both are refused together with ``--include``/``--exclude``.
    """
    if (num_nodes > 0 or num_slots > 0) and (include or exclude):
        raise ValueError(
            "--num_nodes/--num_gpus cannot be combined with --include/--exclude; "
            "say which slots to use with one of the two."
        )
    resources = filter_resources({h: list(range(n)) for h, n in pool.items()}, include, exclude)
    if num_nodes > 0:
        if num_nodes > len(resources):
            raise ValueError(
                f"--num_nodes {num_nodes} asks for more hosts than the {len(resources)} available "
                f"({', '.join(resources)}); lower --num_nodes or add hosts to the hostfile."
            )
        resources = dict(list(resources.items())[:num_nodes])
    if num_slots > 0:
        resources = {h: list(range(num_slots)) for h in resources}
    return resources
