"""Robust LoRA fine-tuning of a real pretrained LLM (SmolLM2-135M-Instruct): scores and training throughput.

    python benchmarks/llm.py                     # --full demo setting + throughput; writes docs/benchmarks.md
    python benchmarks/llm.py --setting fast      # the `robustft demo --llm` default (a few minutes)
    python benchmarks/llm.py --skip-scores --rounds 3 --steps 6     # throughput only

1. Scores: ``robustft.demos.llm.run_llm_demo`` in the chosen setting: base model, plain LoRA, WiSE-FT at α*
   (chosen on in-distribution loss only, and under the retained budget), EMA, Flat-LoRA, LoRA-MGPO and
   Momentum-SAM, each scored by the mean answer-token loss on the in-distribution, shifted and
   retained-capability sets (lower is better), each row's difference from plain LoRA with its 95% paired
   bootstrap interval over the items (n in the table's footer).
2. Throughput: training tokens per second of plain LoRA and of each callback on the same model and data,
   ``--steps`` optimizer steps per run. The variants are interleaved (the order rotates every round) and
   repeated ``--rounds`` times; each round's ratio is taken against that round's plain run, and the table
   gives the median and the range (min-max) over rounds. On a machine shared with other jobs, step times
   jump at random by several times: the load average before and after is printed with the table.

The section between the ``llm-benchmark`` markers in ``docs/benchmarks.md`` is replaced with the result
and the command (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from robustft.demos import llm as demo_llm  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402

THROUGHPUT_VARIANTS = ("plain LoRA", "EMA", "Flat-LoRA", "LoRA-MGPO", "Momentum-SAM")
START, END = "<!-- llm-benchmark:start -->", "<!-- llm-benchmark:end -->"


def variant_callbacks(name: str, cfg: demo_llm.LLMDemoConfig) -> list:
    """The callbacks of one throughput variant (EMA alone here, not sharing the plain run)."""
    if name == "EMA":
        from robustft import EMACallback

        return [EMACallback(decay=cfg.ema_decay, warmup=True, eval_with_ema=False, save_dir=None)]
    return demo_llm._method_callbacks(name, cfg)


def train_once(name: str, cfg, model_dir: Path, train, tokenizer, out: Path, device: str = "cpu",
               bf16: bool = False) -> tuple[float, list[float]]:
    """One short LoRA run of variant ``name``: (tokens per optimizer step, step seconds after the first)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 **demo_llm.quantized_loading(cfg, device))  # --4bit: NF4
    clock = demo_llm.step_clock()
    trainer = SFTTrainer(
        model=model,
        args=demo_llm.sft_config(out, cfg, use_cpu=device == "cpu", bf16=bf16, logging_steps=10**6),
        train_dataset=train, processing_class=tokenizer, peft_config=demo_llm.lora_config(cfg),
        callbacks=[clock, *variant_callbacks(name, cfg)],
    )
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock.tokens / cfg.steps, clock.step_seconds[1:]


def throughput(cfg, rounds: int, device: str = "cpu", bf16: bool = False,
               variants=THROUGHPUT_VARIANTS) -> dict[str, dict[str, list[float]]]:
    """Interleaved, repeated short runs: per variant, tokens/s and the ratio to plain LoRA, per round."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    model_dir = demo_llm.model_path()
    task = demo_llm.make_definition_task(demo_llm.wordnet_dir(), cfg.n_train, cfg.n_eval, cfg.seed)
    train = Dataset.from_list(task["train"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per = {v: {"tokens_per_s": [], "ratio": []} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])
            speed = {}
            for v in order:
                tokens, steps = train_once(v, cfg, model_dir, train, tokenizer, Path(tmp) / v, device, bf16)
                speed[v] = tokens / statistics.median(steps)
                print(f"round {r + 1}/{rounds} {v:13s} {speed[v]:8.1f} tokens/s "
                      f"(median of {len(steps)} steps, {tokens:.0f} tokens/step)", flush=True)
            for v in variants:
                per[v]["tokens_per_s"].append(speed[v])
                per[v]["ratio"].append(speed["plain LoRA"] / speed[v])
    return per


def throughput_table(per: dict[str, dict[str, list[float]]]) -> str:
    rows = []
    for v, d in per.items():
        t, r = d["tokens_per_s"], d["ratio"]
        rows.append([v, f"{statistics.median(t):.0f}", f"{min(t):.0f}-{max(t):.0f}",
                     f"{statistics.median(r):.2f}x", f"{min(r):.2f}-{max(r):.2f}x"])
    return format_table(
        ["variant", "tokens/s (median)", "tokens/s (range)", "step time / plain (median)", "range"], rows
    )


def write_section(text: str, path: Path = ROOT / "docs" / "benchmarks.md", start: str = START,
                  end: str = END) -> None:
    """Replace the text between the ``start`` and ``end`` markers (default: llm-benchmark's), or append it."""
    doc = path.read_text()
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=["full", "fast"], default="full")
    p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per throughput run")
    p.add_argument("--skip-scores", action="store_true", help="throughput only")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_llm_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    from dataclasses import replace

    cfg = demo_llm.FULL if args.setting == "full" else demo_llm.FAST
    command = "python benchmarks/llm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "## LLM: robust LoRA fine-tuning of SmolLM2-135M-Instruct",
        "",
        f"Command: `{command.strip()}` (written by the script; setting `{args.setting}`: "
        f"{cfg.n_train} training examples, {cfg.steps} steps x {cfg.batch_size}, LoRA r={cfg.rank} on every "
        f"linear layer, lr {cfg.learning_rate:g}; eval {cfg.n_eval} words per set). Load average at start: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above ~1 per core, other jobs were running).",
    ]
    if not args.skip_scores:
        t0 = time.time()
        result = demo_llm.run_llm_demo(args.out, cfg, progress=False)
        parts += [
            "",
            "Mean answer-token loss (lower is better): `id` held-out WordNet definitions of animals and "
            "plants, `shifted` definitions of artifacts, `retained` the base model's own answers to "
            "general prompts (forgetting raises it). WiSE-FT (budget): the best `id` loss among the α whose "
            f"retained loss is at most {cfg.retained_budget:g} above the base model's. Time: wall seconds of "
            "that row's training run (EMA shares the plain LoRA run; WiSE-FT adds its α sweep).",
            "",
            result.table(),
            "",
            result.summary(),
            f"Total {time.time() - t0:.0f} s.",
        ]
    if not args.skip_throughput:
        tcfg = replace(cfg, steps=args.steps)
        load0 = os.getloadavg()[0]
        per = throughput(tcfg, args.rounds)
        parts += [
            "",
            f"Training throughput, {args.rounds} interleaved rounds of {args.steps} steps per variant "
            f"(batch {tcfg.batch_size}, median step after the first; the ratio is the step time over the "
            f"same round's plain LoRA step). Load average {load0:.1f} before, {os.getloadavg()[0]:.1f} "
            "after (on a shared machine single runs vary by several times: read the medians and the ranges).",
            "",
            throughput_table(per),
        ]
    text = "\n".join(parts)
    print("\n" + text)
    if not args.no_write:
        write_section(text)
        print(f"\nwritten to {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
