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
    "robustft.analysis.cli",
    "robustft.demos.cli",
    "robustft.merge.cli",
    "robustft.lora.cli",
    "robustft.interpolation.cli",
]


OUT_HELP = "output folder (must not exist unless --overwrite)"


def add_output_options(
    parser: argparse.ArgumentParser,
    out_help: str = OUT_HELP,
    *,
    required: bool = True,
    overwrite_help: str = "replace an existing output folder",
    progress: bool = False,
) -> None:
    """Add ``--out``, ``--overwrite`` (and ``--no-progress``): the options of every sub-command that writes
    a folder, declared once so their names, meanings and help read the same in each command."""
    parser.add_argument("--out", required=required, help=out_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _reported_errors() -> tuple[type[BaseException], ...]:
    """Bad input or a failing disk: ValueError (every validation), OSError (missing/existing paths, a full
    or read-only disk), and the safetensors library's error for a malformed file it was asked to read."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None:
        errors.append(safetensors.SafetensorError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; bad input or a disk error prints ``robustft CMD: error: ...`` and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _reported_errors()):
            raise
        print(f"robustft {args.command}: error: {str(err) or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
