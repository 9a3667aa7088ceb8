"""``robustft merge RECIPE.yaml --out DIR [--overwrite]``: streamed merge of checkpoints from a recipe."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge checkpoints from a YAML recipe (TIES, DARE, task arithmetic, ...)",
        description="Merge whole checkpoints tensor by tensor from a YAML recipe into a loadable folder "
        "(sharded safetensors + index, config, tokenizer). See docs/merging.md for the recipe format.",
    )
    p.add_argument(
        "recipe", help="YAML recipe (merge_method, base_model, models, parameters, dtype, overrides)"
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--max-shard-size", default=None, help="shard size, e.g. 2GB or 500MiB (default: recipe or 5GB)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustft.merge.engine import merge_checkpoints

    result = merge_checkpoints(
        args.recipe,
        args.out,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    print(
        f"merged {result.tensors} tensors into {result.out_dir} "
        f"({len(result.files)} file(s), {result.seconds:.1f} s)"
    )
    return 0
