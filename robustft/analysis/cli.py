"""``robustft report``: the WiSE-FT curve of your own fine-tuned model, with the retained loss, offline.

Examples::

    robustft report --base ./base --adapter ./my-lora --id id.jsonl --shift shift.jsonl --out report
    robustft report --base ./base --model ./finetuned --id id.jsonl --prompts my_prompts.txt --out report

The parser is built without importing torch; the engine is :mod:`robustft.analysis.report`.
"""

from __future__ import annotations

import argparse

from robustft.cli import add_output_options

__all__ = ["register", "run"]


def _alphas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="WiSE-FT curve and retained loss of your own fine-tuned model (offline)",
        description="Evaluate θ(α) between --base and the fine-tuned model (--adapter: B ← α·B; --model: "
        "weights interpolated) on your --id data (and --shift), and on a retention set of the base model's "
        "own greedy answers (retained loss, KL to base); α* is chosen on --id only. Writes a table, the "
        "curve (JSON, CSV, plot) and report.json into --out.",
    )
    p.add_argument("--base", required=True, help="the base model folder (transformers, with its tokenizer)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a fine-tuned full model folder")
    which.add_argument("--adapter", help="a PEFT LoRA adapter folder trained on --base")
    p.add_argument("--id", required=True, dest="id_path", metavar="JSONL",
                   help="in-distribution JSONL: {'messages': [...]} or {'prompt', 'completion'} rows")
    p.add_argument("--shift", dest="shift_path", metavar="JSONL", help="shifted JSONL (same row shapes)")
    p.add_argument("--prompts", dest="prompts_path", metavar="FILE",
                   help="retention prompts: a text file (one a line) or JSONL of 'prompt' (default: the "
                   "shipped list of 100 general prompts)")
    p.add_argument("--retention", dest="retention_path", metavar="JSONL",
                   help="retention set JSONL to reuse or create (default: OUT/retention.jsonl)")
    p.add_argument("--rebuild-retention", action="store_true",
                   help="regenerate a retention set that was built from other weights or settings")
    p.add_argument("--alphas", type=_alphas, default=None,
                   help="comma-separated α grid (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit of a new retention set (default 128; a reused set keeps its "
                   "own)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    add_output_options(p, "output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustft.analysis.report import DEFAULT_ALPHAS, run_report

    report = run_report(
        base=args.base, id_path=args.id_path, out=args.out, model=args.model, adapter=args.adapter,
        shift_path=args.shift_path, prompts_path=args.prompts_path, retention_path=args.retention_path,
        alphas=args.alphas or DEFAULT_ALPHAS, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
        batch_size=args.batch_size, overwrite=args.overwrite, rebuild_retention=args.rebuild_retention,
    )
    print(report.table())
    print(report.summary() + f" ({report.seconds:.1f} s)")
    print(f"written: {args.out}/report.json, report.md, wise_ft.png, wise_ft.csv, wise_ft.json")
    return 0
