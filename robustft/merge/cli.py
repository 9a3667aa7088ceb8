"""``robustft merge`` (a streamed merge of checkpoints from a YAML recipe), ``robustft interpolate``
(θ(α) of two checkpoints), ``robustft average`` (the uniform mean of a run's checkpoints) and
``robustft warp`` (WARP's merge + LITI), all recipes of the same engine; and
``robustft align`` (Git Re-Basin: permute one model's hidden units to match another before merging),
``robustft search`` (a recipe's coefficients chosen by evaluation) and ``robustft tall`` (TALL-mask
compression of fine-tuned checkpoints, and extraction of one task's model)."""

from __future__ import annotations

import argparse
import os

from robustft.cli import add_output_options


def register(subparsers) -> None:
    _register_merge(subparsers)
    _register_interpolate(subparsers)
    _register_average(subparsers)
    _register_warp(subparsers)
    _register_align(subparsers)
    _register_search(subparsers)
    _register_tall(subparsers)


def _register_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge checkpoints from a YAML recipe (TIES, DARE, task arithmetic, ...)",
        description="Merge whole checkpoints tensor by tensor from a YAML recipe into a loadable folder "
        "(sharded safetensors + index, config, tokenizer). See docs/merging.md for the recipe format.",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        help="YAML recipe (merge_method, base_model, models, parameters, dtype, overrides)",
    )
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="output folder (as mergekit-yaml; or --out)")
    add_output_options(p, required=False, progress=True)
    p.add_argument(
        "--list", action="store_true", help="print every merge method with its parameters and defaults"
    )
    p.add_argument(
        "--max-shard-size", default=None, help="shard size, e.g. 2GB or 500MiB (default: recipe or 5GB)"
    )
    p.add_argument(
        "--workers", type=int, default=None,
        help="tensors merged at once by threads (default: torch's intra-op thread count)",
    )  # fmt: skip
    mk = p.add_argument_group(
        "mergekit-yaml flags", "accepted for the same command lines (docs/merging.md, Coming from mergekit)"
    )
    mk.add_argument(
        "--out-shard-size", default=None, metavar="N",
        help="mergekit's shard size: N bytes, K/M/B = 10^3/10^6/10^9 (e.g. 5B); as --max-shard-size",
    )  # fmt: skip
    mk.add_argument("--random-seed", type=int, default=None, help="the recipe's seed (random methods)")
    mk.add_argument(
        "--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
        help="copy the tokenizer (default); --no-copy-tokenizer: weights and config only",
    )  # fmt: skip
    mk.add_argument(
        "--lazy-unpickle", action="store_true", help="no effect: safetensors are always read lazily"
    )
    mk.add_argument("--allow-crimes", action="store_true", help="no effect: architectures are not compared")
    mk.add_argument(
        "--cuda", action="store_true", help="refused without CUDA; else accepted, the merge runs on the CPU"
    )
    p.set_defaults(func=run_merge)


def parse_kmb(value: str) -> int:
    """mergekit's size notation (``parse_kmb``): digits, or digits with K, M or B (10^3, 10^6, 10^9)."""
    text = str(value).strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit():
        raise ValueError(f"--out-shard-size: expected digits with an optional K, M or B, got {value!r}")
    return int(digits) * scale


def run_merge(args: argparse.Namespace) -> int:
    if args.list:
        from robustft.merge.registry import describe_methods

        print(describe_methods())
        return 0
    if args.out_dir is not None and args.out is not None:
        raise ValueError("give the output folder once (OUT or --out)")
    out = args.out_dir if args.out_dir is not None else args.out
    if args.recipe is None or out is None:
        raise ValueError("give a RECIPE and --out DIR (or --list to see the merge methods)")
    if args.out_shard_size is not None and args.max_shard_size is not None:
        raise ValueError("give --max-shard-size or --out-shard-size, not both")
    shard_size = parse_kmb(args.out_shard_size) if args.out_shard_size is not None else args.max_shard_size
    import dataclasses

    import torch

    if args.cuda and not torch.cuda.is_available():
        raise ValueError("--cuda: CUDA is not available (robustft merges on the CPU: leave --cuda out)")
    from robustft.merge.engine import merge_checkpoints
    from robustft.merge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.random_seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.random_seed)
    if not args.copy_tokenizer:  # no copied tokenizer; a built vocabulary's (and its chat_template) stays
        recipe = dataclasses.replace(recipe, tokenizer_source=None)
    result = merge_checkpoints(
        recipe,
        out,
        overwrite=args.overwrite,
        max_shard_size=shard_size,
        progress=not args.no_progress,
        workers=args.workers,
    )
    print(
        f"merged {result.tensors} tensors into {result.out_dir} "
        f"({len(result.files)} file(s), {result.seconds:.1f} s)"
    )
    return 0


def _register_interpolate(subparsers) -> None:
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
    add_output_options(p)
    p.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    p.set_defaults(func=run_interpolate)


def run_interpolate(args: argparse.Namespace) -> int:
    from robustft.merge.interpolate import interpolate_checkpoints

    info = interpolate_checkpoints(
        args.start, args.end, args.out, args.alpha, args.method, args.extrapolate, args.overwrite
    )
    print(
        f"wrote {args.out}: {info['tensors']} tensors in {info['shards']} file(s), "
        f"alpha={info['alpha']:g} ({info['method']})"
    )
    return 0


def _register_average(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="uniform average of a run's checkpoint folders (or of PEFT adapters), streamed",
        description="Average saved checkpoints tensor by tensor into a loadable folder: the merge engine "
        "with a linear recipe of equal weights (normalize: true). A run folder or a glob stands for its "
        "checkpoint-* folders, sorted by step; --last N keeps the latest N. PEFT adapter folders are "
        "averaged as their deltas, the mean of B·A, exactly (as robustft lora compose --weights 1/N ...). "
        "See docs/averaging.md.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint folders, a run folder (its checkpoint-* folders) or a quoted glob")
    add_output_options(p, progress=True)
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="average only the latest N checkpoints")
    p.set_defaults(func=run_average)


def checkpoint_step(path: str) -> int | None:
    """The step of a Trainer checkpoint folder ``checkpoint-<step>``; None for any other name."""
    import re

    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def average_inputs(items: list[str], last: int | None = None) -> list[str]:
    """The folders to average: globs and run folders expanded to their checkpoint-* folders sorted by step."""
    import glob

    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ValueError(f"--last must be a positive integer, got {last!r}")
    paths: list[str] = []
    for item in items:
        if glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches nothing")
            paths.extend(found)
        elif os.path.isdir(item) and not _has_weights(item) and glob.glob(os.path.join(item, "checkpoint-*")):
            paths.extend(p for p in glob.glob(os.path.join(item, "checkpoint-*")) if os.path.isdir(p))
        else:
            paths.append(item)
    steps = [checkpoint_step(p) for p in paths]
    if all(s is not None for s in steps):
        paths = [p for _, p in sorted(zip(steps, paths))]
    elif last is not None:
        raise ValueError("--last needs checkpoint-<step> folders (the latest are chosen by step); got "
                         + ", ".join(p for p, s in zip(paths, steps) if s is None))
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise ValueError(f"a checkpoint is given twice: {paths}")
    return paths[-last:] if last is not None else paths


def _has_weights(folder: str) -> bool:
    import glob

    return bool(glob.glob(os.path.join(folder, "*.safetensors"))) or os.path.isfile(
        os.path.join(folder, "adapter_config.json"))


def run_average(args: argparse.Namespace) -> int:
    from robustft.interpolation.soup import write_uniform_soup

    soup = write_uniform_soup(average_inputs(args.checkpoints, args.last), args.out, args.overwrite,
                              progress=not args.no_progress)
    if soup.adapters:
        print(f"averaged {len(soup.inputs)} adapters into {soup.out_dir} ({soup.tensors} modules)")
    else:
        print(f"averaged {len(soup.inputs)} checkpoints into {soup.out_dir}: {soup.tensors} tensors "
              f"({soup.files} file(s), {soup.seconds:.1f} s)")
    return 0


def _register_warp(subparsers) -> None:
    p = subparsers.add_parser(
        "warp",
        help="WARP step: spherical merge of M policies' task vectors, then LITI toward the init",
        description="Write the next WARP init: theta = (1-eta)*init + eta*merged, where merged is the "
        "spherical merge of the policies' task vectors (policy - init). Streamed by the merge engine "
        "(recipe: merge_method METHOD, base_model INIT, parameters {lambda: ETA}). See docs/alignment.md.",
    )
    p.add_argument(
        "--init", required=True, help="the iteration's init checkpoint folder (config/tokenizer copied)"
    )
    p.add_argument("--policies", required=True, nargs="+", help="the M fine-tuned policy checkpoint folders")
    p.add_argument(
        "--eta", required=True, type=float, help="LITI coefficient: 0 = init, 1 = the merged policy"
    )
    p.add_argument(
        "--method",
        default="warp",
        help="merge of the task vectors: warp (iterated SLERP, default), nuslerp (M=2), multislerp, karcher",
    )
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per policy (default 1)")
    add_output_options(p, progress=True)
    p.add_argument("--extrapolate", action="store_true", help="allow eta outside [0, 1], negative --weights")
    p.set_defaults(func=run_warp)


def run_warp(args: argparse.Namespace) -> int:
    from robustft.merge.interpolate import warp_checkpoints

    result = warp_checkpoints(
        args.init,
        args.policies,
        args.out,
        args.eta,
        method=args.method,
        weights=args.weights,
        extrapolate=args.extrapolate,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.out_dir}: {result.tensors} tensors, eta={args.eta:g} toward {args.init} "
        f"({args.method} of {len(args.policies)} policies, {result.seconds:.1f} s)"
    )
    return 0


def _register_align(subparsers) -> None:
    p = subparsers.add_parser(
        "align",
        help="Git Re-Basin: permute MODEL's hidden units (MLP units, attention heads) to match REFERENCE",
        description="Weight matching (Ainsworth et al. 2023): write MODEL with its hidden units permuted to "
        "best match REFERENCE. The output computes the same function as MODEL, and merges or interpolates "
        "with REFERENCE with a lower loss barrier. Families: nn.Sequential MLPs, Llama (mistral, qwen2, "
        "qwen3), GPT-2, BERT. See docs/merging.md.",
    )
    p.add_argument("--reference", required=True, help="the model to match (checkpoint folder or file)")
    p.add_argument("--model", required=True, help="the model to permute (its config/tokenizer are copied)")
    add_output_options(p)
    p.add_argument("--family", default=None, help="mlp, llama, gpt2 or bert (default: from config.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the permutations are visited in")
    p.add_argument("--max-iter", type=int, default=100, help="at most this many sweeps over the permutations")
    p.set_defaults(func=run_align)


def run_align(args: argparse.Namespace) -> int:
    from robustft.merge.align import align_checkpoints

    result = align_checkpoints(
        args.reference, args.model, args.out, args.family, args.seed, args.max_iter, args.overwrite
    )
    moved = sum(result.moved.values())
    print(
        f"wrote {result.out_dir}: {args.model} aligned to {args.reference} ({result.family}, "
        f"{len(result.moved)} permutations, {moved} units moved, {result.sweeps} sweeps, "
        f"{result.seconds:.1f} s)"
    )
    return 0


def _register_search(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="choose a recipe's weights (density, lambda, per layer group) by evaluation; write the best",
        description="Search a recipe's coefficients: every trial merges in memory from the inputs read once, "
        "loads the result into the model and scores it on --eval; the study (optuna, SQLite) resumes after "
        "a kill. Writes best.yaml (mergekit-compatible), trials.csv/.json/.png. See docs/merging.md, "
        "'Choosing coefficients: robustft search'.",
    )
    p.add_argument("recipe", help="YAML recipe (its models: form; the searched values are filled in)")
    p.add_argument("--eval", required=True, metavar="DATA",
                   help="JSONL file or datasets folder: a causal LM is scored by its loss on the answer "
                   "tokens of {prompt, answer} rows ({text}: every token), a sequence classifier by its "
                   "accuracy on {text, label} rows")
    add_output_options(p, "output folder (the study lives there: run again to resume)",
                       overwrite_help="start afresh: drop a study already in --out", progress=True)
    p.add_argument("--param", action="append", default=None, metavar="KEY=LOW:HIGH[:log]",
                   help="a searched parameter of the method and its range (repeatable; default weight=0:1)")
    p.add_argument("--layer-groups", type=int, default=1, metavar="K",
                   help="K values per parameter spread over the layers (a gradient list; default 1)")
    p.add_argument("--sampler", default="auto", help="auto (a grid for <= 2 values, else tpe), tpe, cmaes")
    p.add_argument("--trials", type=int, default=None, help="finished trials in total (default: the grid)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for this run")
    p.add_argument("--grid-points", type=int, default=5, help="values per searched number on a grid")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--max-length", type=int, default=256, help="tokens per evaluation row at most")
    p.set_defaults(func=run_search)


def parse_search_param(text: str, groups: int = 1):
    """``KEY=LOW:HIGH`` or ``KEY=LOW:HIGH:log`` -> a SearchParam (the registry checks the key later)."""
    from robustft.merge.search import SearchParam

    key, sep, rng = text.partition("=")
    parts = rng.split(":")
    if not sep or not key or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise ValueError(f"--param: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log, got {text!r}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"--param {text!r}: LOW and HIGH must be numbers") from None
    return SearchParam(key.strip(), low, high, log=len(parts) == 3, groups=groups)


def run_search(args: argparse.Namespace) -> int:
    params = [parse_search_param(t, args.layer_groups) for t in (args.param or ["weight=0:1"])]
    from robustft.merge.io import resolve_model
    from robustft.merge.recipe import load_recipe
    from robustft.merge.search import (
        dataset_objective,
        read_eval_rows,
        search_dimensions,
        search_merge,
    )

    recipe = load_recipe(args.recipe)
    search_dimensions(recipe, params)  # bad parameters named before any model is loaded
    rows = read_eval_rows(args.eval)
    model, tokenizer, causal = _auto_model(resolve_model(recipe.reference_model))
    objective, metric, greater = dataset_objective(rows, tokenizer, causal, args.batch_size, args.max_length)
    result = search_merge(
        recipe, model, objective, params, args.out, greater_is_better=greater, n_trials=args.trials,
        timeout=args.timeout, sampler=args.sampler, grid_points=args.grid_points, seed=args.seed,
        progress=not args.no_progress, overwrite=args.overwrite, metric_name=metric,
    )
    best = ", ".join(f"{k}={v:.4g}" for k, v in result.best_params.items())
    print(f"best {metric} {result.best_value:.6g} ({best}) after {len(result.trials)} trials "
          f"({result.evaluations} evaluated in this run); wrote {result.out_dir / 'best.yaml'}")
    return 0


def _auto_model(folder):
    """(model, tokenizer, is causal LM) of a reference checkpoint: its config's causal-LM or sequence-
    classification architecture, float32, loaded once; other architectures are refused by name."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = os.path.join(folder, "config.json")
    with open(config) if os.path.isfile(config) else open(os.devnull) as f:
        text = f.read()
    arch = (json.loads(text).get("architectures") or [""])[0] if text else ""
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        cls, causal = AutoModelForCausalLM, True
    elif arch.endswith("ForSequenceClassification"):
        cls, causal = AutoModelForSequenceClassification, False
    else:
        raise ValueError(f"{folder}: architecture {arch or 'unknown'!r}; robustft search scores causal LMs "
                         "and sequence classifiers (other models: the Python API "
                         "robustft.merge.search.search_merge with your own objective)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return cls.from_pretrained(folder, dtype=torch.float32), tokenizer, causal


def _register_tall(subparsers) -> None:
    p = subparsers.add_parser(
        "tall",
        help="TALL masks: store fine-tuned checkpoints as one task vector + a bit mask each, or extract one",
        description="TALL-mask compression (Wang et al. 2024): 'compress' stores tau_MTL = sum of the task "
        "vectors and one bit-packed mask per task, m_t = |tau_t| >= lambda*|tau_MTL - tau_t|; 'extract' "
        "writes task t's model base + m_t * tau_MTL as a loadable folder. See docs/merging.md.",
    )
    sub = p.add_subparsers(dest="tall_command", metavar="ACTION", required=True)
    c = sub.add_parser("compress", help="compress fine-tuned checkpoints of one base")
    c.add_argument("--base", required=True, help="the checkpoint every model was fine-tuned from")
    c.add_argument("--models", required=True, nargs="+", help="the fine-tuned checkpoint folders")
    c.add_argument("--tasks", nargs="+", default=None, help="a name per model (default: folder names)")
    c.add_argument("--lambda", dest="lambda_", nargs="+", type=float, default=[0.6],
                   help="mask threshold lambda (one for all, or one per model; default 0.6)")
    add_output_options(c)
    c.set_defaults(func=run_tall_compress)
    e = sub.add_parser("extract", help="write one task's model from a compression")
    e.add_argument("compressed", help="the folder written by 'robustft tall compress'")
    e.add_argument("--task", required=True, help="the task's name (or its index)")
    e.add_argument("--base", default=None, help="the base checkpoint (default: the path recorded)")
    add_output_options(e)
    e.set_defaults(func=run_tall_extract)


def run_tall_compress(args: argparse.Namespace) -> int:
    from robustft.merge.tall import tall_compress_checkpoints

    lambda_ = args.lambda_[0] if len(args.lambda_) == 1 else args.lambda_
    r = tall_compress_checkpoints(args.base, args.models, args.out, lambda_, args.tasks, args.overwrite)
    dens = ", ".join(f"{t} {d:.1%}" for t, d in r.density.items())
    print(f"wrote {r.out_dir}: {len(r.tasks)} tasks, {r.tensors} tensors, {r.nbytes / 1e6:.1f} MB for "
          f"{r.inputs_nbytes / 1e6:.1f} MB of fine-tuned checkpoints ({r.nbytes / r.inputs_nbytes:.2f}x); "
          f"mask density {dens} ({r.seconds:.1f} s)")
    return 0


def run_tall_extract(args: argparse.Namespace) -> int:
    from robustft.merge.tall import tall_extract

    task = int(args.task) if args.task.isdigit() else args.task
    out = tall_extract(args.compressed, task, args.out, args.base, args.overwrite)
    print(f"wrote {out}: task {args.task} of {args.compressed}")
    return 0
