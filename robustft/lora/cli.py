"""``robustft lora {add,negate,scale,compose,compress}``: exact arithmetic on saved PEFT LoRA adapters.

Examples::

    robustft lora add skill_a skill_b --out both
    robustft lora compose --adapters a b toxic --weights 1 1 -0.5 --rank 16 --out composed
    robustft lora compress big_adapter --rank 8 --out small_adapter
    robustft lora compose --adapters a b c --method della --param density=0.3 --seed 0 --rank 16 --out d
    robustft lora negate toxic --out detox --merge-into ./base_model   # a dense model instead
"""

from __future__ import annotations

import argparse

from robustft.cli import add_output_options

__all__ = ["register", "run"]

_DTYPES = ("bfloat16", "float16", "float32")  # names only: the parser is built without importing torch


def _common(p: argparse.ArgumentParser, method: bool = True, rank: bool = True) -> None:
    add_output_options(p, "output folder (an adapter, or a dense model with --merge-into)")
    if method:
        p.add_argument(
            "--method",
            default="exact",
            metavar="METHOD",
            help="exact: ΔW = Σ w_i ΔW_i by rank concatenation (default); paper: Zhang et al. 2023's "
            "factor-space addition/negation; the others: that merge method (as in a merge recipe) on each "
            "module's dense ΔW_i, refactored to --rank (an unknown name lists the methods)",
        )
        p.add_argument(
            "--density", type=float, default=None, help="ties/dare_ties: fraction kept per ΔW_i, in (0, 1]"
        )
        p.add_argument("--drop-rate", type=float, default=None, help="dare_*: drop probability p, in [0, 1)")
        p.add_argument("--seed", type=int, default=None, help="dare_*, della*: seed of the drop masks")
        p.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="any other parameter of the method, as in a merge recipe (value read as YAML), e.g. "
            "--param epsilon=0.1 --param sv_reduction=0.25; repeatable",
        )
    if rank:
        p.add_argument(
            "--rank", type=int, default=None, help="compress the result to this rank (best rank-r)"
        )
    p.add_argument(
        "--extras",
        choices=["same", "first", "drop"],
        default="same",
        help="non-LoRA tensors (modules_to_save): keep if identical, keep the first's, or drop",
    )
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="dtype of the written factors")
    p.add_argument("--merge-into", metavar="BASE_DIR", default=None, help="write BASE + ΔW as a dense model")
    p.add_argument(
        "--model-class", default=None, help="transformers class for --merge-into (default: config)"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lora",
        help="exact arithmetic on PEFT LoRA adapters",
        description="Add, negate, scale, compose and compress PEFT LoRA adapters exactly in factor space.",
    )
    sub = parser.add_subparsers(dest="lora_command", metavar="OP", required=True)
    p = sub.add_parser("add", help="ΔW = ΔW_1 + ΔW_2 + ...")
    p.add_argument("adapters", nargs="+", help="adapter folders")
    _common(p)
    p = sub.add_parser("negate", help="ΔW = -ΔW_1")
    p.add_argument("adapter", help="adapter folder")
    _common(p)
    p = sub.add_parser("scale", help="ΔW = c · ΔW_1")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--factor", type=float, required=True, help="the scalar c")
    _common(p, method=False)
    p = sub.add_parser("compose", help="ΔW = Σ w_i ΔW_i")
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders")
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, help="one weight per adapter (default 1)"
    )
    _common(p)
    p = sub.add_parser("compress", help="best rank-r approximation of ΔW, from the factors")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--rank", type=int, required=True, help="target rank r")
    _common(p, method=False, rank=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustft.core.checkpoint import check_output_dir
    from robustft.core.params import resolve_dtype
    from robustft.lora.compose import check_compose, compose_adapters, merge_into_base
    from robustft.lora.io import TRUNCATION_NAME, read_adapter, write_adapter

    op = args.lora_command
    if op == "add":
        paths, weights = args.adapters, [1.0] * len(args.adapters)
    elif op == "negate":
        paths, weights = [args.adapter], [-1.0]
    elif op == "scale":
        paths, weights = [args.adapter], [args.factor]
    elif op == "compress":
        paths, weights = [args.adapter], [1.0]
    else:
        paths = args.adapters
        weights = args.weights if args.weights is not None else [1.0] * len(paths)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    params = {
        k: getattr(args, k) for k in ("density", "drop_rate", "seed") if getattr(args, k, None) is not None
    }
    method = getattr(args, "method", "exact")
    # every value checked by the merge-method registry (as in a merge recipe) before any file is touched
    options = {k: "--" + k.replace("_", "-") for k in ("method", "density", "drop_rate", "seed")}
    for item in getattr(args, "param", []):
        key, value = _param(item)
        if key in params:
            raise ValueError(f"--param {item}: {key} is given twice")
        params[key], options[key] = value, f"--param {key}"
    options["weights"] = "--factor" if op == "scale" else "--weights"
    check_compose(method, weights, params, len(paths), options)
    check_output_dir(args.out, args.overwrite, [*paths, args.merge_into])
    adapters = [read_adapter(p) for p in paths]
    composed = compose_adapters(
        adapters,
        weights,
        method=method,
        rank=args.rank,
        extras=args.extras,
        params=params,
    )
    if args.merge_into:
        out = merge_into_base(composed, args.merge_into, args.out, args.overwrite, args.model_class, paths)
        print(f"robustft lora {op}: wrote dense model {out} ({len(composed.deltas)} modules merged)")
    else:
        out = write_adapter(composed, args.out, args.overwrite, resolve_dtype(args.dtype), paths)
        ranks = [d.rank for d in composed.deltas.values()]
        print(
            f"robustft lora {op}: wrote adapter {out} ({len(ranks)} modules, rank {min(ranks)}-{max(ranks)})"
        )
    errors = composed.truncation_errors
    if errors:
        worst = max(errors, key=errors.get)
        saved = "" if args.merge_into else f"; per module in {out / TRUNCATION_NAME}"
        print(
            f"truncation error ‖ΔW − ΔW_r‖/‖ΔW‖: mean {sum(errors.values()) / len(errors):.3g}, "
            f"max {errors[worst]:.3g} ({worst}){saved}"
        )
        for module in sorted(errors):
            print(f"  {module}: {errors[module]:.6g}")
    return 0


def _param(item: str) -> tuple[str, object]:
    """``NAME=VALUE`` of ``--param`` -> (name, value read as YAML, as a merge recipe's)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--param {item!r}: expected NAME=VALUE")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"--param {item!r}: the value is not YAML ({err})") from None
    return key.strip(), value
