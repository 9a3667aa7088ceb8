"""``robustft interpolate``: θ(α) of two saved checkpoints, streamed tensor by tensor into a new folder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "interpolate",
        help="WiSE-FT: interpolate two checkpoints, theta = (1-alpha)*start + alpha*end",
        description="Interpolate two saved safetensors checkpoints (sharded accepted) tensor by tensor "
        "into a folder that from_pretrained loads: theta(alpha) = (1-alpha)*start + alpha*end.",
    )
    p.add_argument("--start", required=True, help="start (pre-trained / zero-shot) checkpoint folder or file")
    p.add_argument(
        "--end", required=True, help="fine-tuned checkpoint folder or file (config/tokenizer copied)"
    )
    p.add_argument("--alpha", required=True, type=float, help="0 = start, 1 = fine-tuned")
    p.add_argument("--method", choices=["linear", "slerp"], default="linear")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustft.merge.interpolate import interpolate_checkpoints

    info = interpolate_checkpoints(
        args.start, args.end, args.out, args.alpha, args.method, args.extrapolate, args.overwrite
    )
    print(
        f"wrote {args.out}: {info['tensors']} tensors in {info['shards']} file(s), "
        f"alpha={info['alpha']:g} ({info['method']})"
    )
    return 0
