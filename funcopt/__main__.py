"""Command line: ``python -m funcopt inspect PATH [--json]`` describes a checkpoint without loading it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``funcopt`` command line; returns the exit status (0 on success, 1 on a bad file)."""
    parser = argparse.ArgumentParser(prog="python -m funcopt", description="funcopt command line tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="print a checkpoint's tree (paths, dtypes, shapes, sizes), step and metadata "
        "from its header, without reading tensor data",
    )
    inspect.add_argument("path", help="a checkpoint written by funcopt.checkpoint.save (or any .safetensors file)")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    args = parser.parse_args(argv)

    from funcopt.checkpoint import CheckpointError
    from funcopt.checkpoint import inspect as inspect_checkpoint

    try:
        info = inspect_checkpoint(args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in info.json_lines() if args.json else info.lines():
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
