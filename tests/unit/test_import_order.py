"""DESIGN.md §4's import direction, checked on the source text.

Imports flow one way: ``__init__`` → ``runtime`` → ``checkpoint`` → ``zero`` → ``precision`` → ``comm`` →
``offload`` / ``config`` / ``accelerator``.  A module of one layer may import only from the layers below
it (and from ``utils``/``version``, which every layer may use).  ``config`` knows no mechanism: it imports
nothing of deepshard but ``utils``.  The pillars that sit beside ``zero`` (``inference`` …) may use the
core; the core must not import them.  ``compat`` (the import-path table) and ``testing`` (the harness)
reach everything by design and are not ranked.  Function-level (lazy) imports count like top-level ones;
imports under ``if TYPE_CHECKING:`` are reported too (a type-only dependency still points one way).

Run ``python tests/unit/test_import_order.py`` to list every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "deepshard"

# Rank of each top-level part: smaller is higher; a module may import only strictly larger ranks
# (equal rank: only its own package).
RANK: dict[str, int] = {
    "__init__": 0,
    "runtime": 1,
    "checkpoint": 2,
    "zero": 3,
    "inference": 3,
    "pipe": 3,
    "tensor_parallel": 3,
    "moe": 3,
    "compression": 3,
    "science": 3,
    "checkpointing": 3,
    "serve": 2,
    "monitor": 3,
    "profiling": 3,
    "precision": 4,
    "comm": 5,
    "offload": 6,
    "config": 6,
    "accelerator": 6,
    "utils": 7,
    "version": 7,
}
UNRANKED = {"compat", "testing", "launcher"}
# Beside-zero pillars may not be imported by the core chain.
PILLARS = {"inference", "pipe", "tensor_parallel", "moe", "compression", "science", "serve"}
CORE = {"runtime", "checkpoint", "zero", "precision", "comm", "offload", "config", "accelerator"}
# The launcher starts processes and imports nothing that trains.
LAUNCHER_MAY = {"launcher", "config", "utils", "version", "accelerator", "comm"}


def _part(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "deepshard":
        return ""
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported deepshard module, type-only) for every deepshard import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_of(path).split(".")
    is_pkg = path.name == "__init__.py"
    type_only_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    if hasattr(inner, "lineno"):
                        type_only_lines.add(inner.lineno)
    out: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod]
            if _part(mod) == "__init__":  # ``from deepshard import comm``: the names are the modules
                names = [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("deepshard"):
                out.append((node.lineno, name, node.lineno in type_only_lines))
    return out


def violations() -> list[str]:
    """Every import against §4's order, as ``file:line: a -> b`` lines."""
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        me = _part(_module_of(path))
        if me in {"compat", "testing"}:
            continue
        for line, target, type_only in _imports(path):
            other = _part(target)
            if other == me or other in {"utils", "version"}:
                continue
            bad = False
            if me == "launcher":
                bad = other not in LAUNCHER_MAY
            elif me == "config" or me in CORE and other in PILLARS | {"compat", "testing", "launcher"}:
                bad = True
            elif me in RANK and other in RANK:
                bad = RANK[other] <= RANK[me]
            if bad:
                rel = path.relative_to(SRC.parent.parent)
                tag = " (type-only)" if type_only else ""
                found.append(f"{rel}:{line}: {me} -> {other} ({target}){tag}")
    return found


def lazy_imports(
    parts: tuple[str, ...] = ("zero", "checkpoint", "comm", "precision", "offload"),
) -> list[str]:
    """Function-level deepshard imports inside ``parts`` (a lazy import often hides a cycle)."""
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        if _part(_module_of(path)) not in parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    text = ast.unparse(node)
                    if "deepshard" in text or (isinstance(node, ast.ImportFrom) and node.level):
                        found.append(f"{path.relative_to(SRC.parent.parent)}:{node.lineno}: {text}")
    return found


# Imports against the order that remain, each with the reason it stays.  Keys are "file: a -> b (target)"
# (line numbers left out so that unrelated edits do not churn the list).
KNOWN: dict[str, str] = {
    "src/deepshard/launcher/launch.py: launcher -> compat (deepshard.compat)": (
        "the launcher puts the `deepspeed` alias directory on PYTHONPATH; compat owns that path "
        "(a path constant, nothing that trains)"
    ),
    "src/deepshard/launcher/cli.py: launcher -> autotuning (deepshard.autotuning.tuner)": (
        "`deepshard --autotuning` hands the command line to the tuner, which starts the short timed runs as "
        "processes (it imports config and nothing that trains)"
    ),
    "src/deepshard/compression/ptq.py: compression -> inference (deepshard.inference.quant)": (
        "post-training quantization exports to the inference engine's packed QuantizedLinear: one packing, "
        "owned by inference (compression sits on inference as serve does)"
    ),
    "src/deepshard/launcher/report.py: launcher -> precision (deepshard.precision.throughput)": (
        "`deepshard report` times a matmul per dtype; the timing helper lives beside the precision "
        "policy that uses it (nothing that trains)"
    ),
}


def _key(v: str) -> str:
    path, _, rest = v.partition(": ")
    return f"{path.rsplit(':', 1)[0]}: {rest}"


def test_import_order_follows_design() -> None:
    new = [v for v in violations() if _key(v) not in KNOWN]
    assert not new, "imports against DESIGN.md §4's order:\n" + "\n".join(new)


if __name__ == "__main__":
    vs = violations()
    for v in vs:
        print(v, "(known: " + KNOWN[_key(v)] + ")" if _key(v) in KNOWN else "")
    print(f"{len(vs)} violations")
    lazy = lazy_imports()
    for v in lazy:
        print("lazy:", v)
    print(f"{len(lazy)} function-level deepshard imports in zero/checkpoint/comm/precision/offload")
    sys.exit(0)
