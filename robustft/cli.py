"""The ``robustft`` command line: parses arguments, then calls into merge/, lora/ and the demo.

Each sub-command lives in its own module with a ``register(subparsers)`` function that adds
its parser and sets ``func``; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from robustft import __version__

# module path of each sub-command; each exposes register(subparsers)
SUBCOMMANDS: list[str] = [
    "robustft.demo",
    "robustft.cli_interpolate",
    "robustft.merge.command",
    "robustft.lora.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustft",
        description="Robust fine-tuning tools: weight interpolation, merging and LoRA arithmetic.",
    )
    parser.add_argument("--version", action="version", version=f"robustft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"robustft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
