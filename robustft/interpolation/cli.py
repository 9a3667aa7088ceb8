"""``robustft soup``: the uniform or greedy soup of saved checkpoints or PEFT adapters (docs/averaging.md).

The parser imports neither torch nor transformers; the work is :mod:`robustft.interpolation.soup`.
"""

from __future__ import annotations

import argparse
import os

from robustft.cli import add_output_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "soup",
        help="model soup (uniform or greedy) of fine-tuned checkpoints or PEFT adapters",
        description="Model soups (Wortsman et al. 2022). uniform: the mean of the checkpoints, streamed by "
        "the merge engine (as robustft average; PEFT adapters: the exact mean of their deltas B·A, a "
        "concatenated-rank adapter). greedy: the candidates scored alone by --score, then added in "
        "decreasing order of in-distribution score while the soup's score does not drop (Alg. 1); the "
        "tensors are loaded once and each soup is written into one live model; the kept ones are then "
        "written as their uniform soup. A run folder or a glob stands for its checkpoint-* folders. "
        "See docs/averaging.md.",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint or adapter folders, a run folder (its checkpoint-* folders) or a quoted glob",
    )
    add_output_options(p, progress=True)
    p.add_argument("--method", choices=["uniform", "greedy"], default="uniform")
    p.add_argument("--last", type=int, default=None, metavar="N", help="only the latest N checkpoints")
    p.add_argument(
        "--score",
        metavar="MODULE:FUNCTION",
        default=None,
        help="greedy: a Python function score(model) -> float (the ID score) or {set: float}",
    )
    p.add_argument(
        "--id-dataset", default="id", help="the in-distribution key of --score's answer (default id)"
    )
    p.add_argument("--lower-is-better", action="store_true", help="the score is a loss")
    p.add_argument(
        "--base-model",
        default=None,
        help="greedy soup of PEFT adapters: their base model folder (the soups are scored on it)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="write soup.json, soup.csv and soup.png into DIR (greedy)",
    )
    p.set_defaults(func=run_soup)


def load_function(spec: str):
    """``package.module:function`` -> the function (the user's own scoring code, imported by name)."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--score: expected MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--score: cannot import {spec!r} ({err})") from err
    if not callable(fn):
        raise ValueError(f"--score: {spec!r} is not callable")
    return fn


def run_soup(args: argparse.Namespace) -> int:
    from robustft.core.checkpoint import check_output_dir
    from robustft.merge.cli import average_inputs

    paths = average_inputs(args.checkpoints, args.last)
    if args.method == "uniform":
        if args.score is not None or args.base_model is not None or args.report is not None:
            raise ValueError("--score, --base-model and --report are for --method greedy")
        return _write(paths, args, "uniform")
    if args.score is None:
        raise ValueError("--method greedy chooses by score: give --score MODULE:FUNCTION")
    check_output_dir(args.out, args.overwrite, paths)
    score = load_function(args.score)
    from robustft.interpolation.soup import is_adapter_folder, soup_model
    from robustft.lora.compose import load_model_class

    adapters = any(is_adapter_folder(p) for p in paths)
    if adapters and args.base_model is None:
        raise ValueError(
            "--method greedy of PEFT adapters scores them on their base model: give --base-model"
        )
    source = args.base_model if adapters else paths[0]
    model = load_model_class(source).from_pretrained(source, use_safetensors=True).eval()
    result = soup_model(
        model,
        paths,
        score,
        "greedy",
        names=[os.path.normpath(p) for p in paths],
        id_dataset=args.id_dataset,
        greater_is_better=not args.lower_is_better,
        progress=not args.no_progress,
    )
    print(result.table())
    if args.report is not None:
        result.save(args.report)
    kept = [p for p in paths if os.path.normpath(p) in result.kept]
    return _write(kept, args, f"greedy soup of {len(kept)} of {len(paths)}")


def _write(paths: list[str], args: argparse.Namespace, what: str) -> int:
    from robustft.interpolation.soup import write_uniform_soup

    soup = write_uniform_soup(paths, args.out, args.overwrite, progress=not args.no_progress)
    kind = "adapters" if soup.adapters else "checkpoints"
    print(
        f"{what}: {len(paths)} {kind} averaged into {soup.out_dir} ({soup.tensors} "
        f"{'modules' if soup.adapters else 'tensors'}, {soup.seconds:.1f} s)"
    )
    return 0
