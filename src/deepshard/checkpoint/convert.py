"""``deepshard convert CKPT_DIR OUT_DIR``: a checkpoint's weights as Hugging Face-style safetensors.

``CKPT_DIR`` may also be a DeepSpeed ZeRO-1/2/3 checkpoint (its fp32 master weights are exported).

Runs in one process without a process group, streaming one tensor at a time (see
:mod:`deepshard.checkpoint.export`), so it works on a machine much smaller than the training job.
"""

from __future__ import annotations

import argparse
import sys

from deepshard.checkpoint.export import DTYPES, export_safetensors
from deepshard.checkpoint.manifest import CorruptCheckpointError


def build_parser() -> argparse.ArgumentParser:
    """The ``convert`` sub-command's arguments."""
    parser = argparse.ArgumentParser(
        prog="deepshard convert",
        description="Export the model weights of a deepshard checkpoint, or of a DeepSpeed ZeRO-1/2/3 checkpoint, "
        "to safetensors (HF layout).",
    )
    parser.add_argument(
        "checkpoint_dir", help="the save_dir given to save_checkpoint, or one of its tag directories"
    )
    parser.add_argument(
        "out_dir", help="directory for model.safetensors (or shards + model.safetensors.index.json)"
    )
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag to export (default: the one named by 'latest')"
    )
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of floating tensors")
    parser.add_argument(
        "--max_shard_size", default="5GB", help="largest output file, e.g. 5GB, 500MB (default 5GB)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        files = export_safetensors(
            args.checkpoint_dir,
            args.out_dir,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        )
    except (FileNotFoundError, ValueError, CorruptCheckpointError) as exc:
        sys.stderr.write(f"deepshard convert: error: {exc}\n")
        return 1
    sys.stdout.write("".join(f"{f}\n" for f in files))
    return 0
