"""What seeing forgetting costs on SmolLM2-135M-Instruct: `robustft report` and ForgettingCallback (issue 24).

    python benchmarks/forgetting.py                          # the full run; writes docs/benchmarks.md
    python benchmarks/forgetting.py --prompts 16 --n-eval 12 --repeats 2 --no-write   # a quick check

1. The retention set, once: ``build_retention_set`` of the base model (the shipped prompts, greedy, batches
   of 16, answers within ``--max-new-tokens``) from scratch (``rebuild=True``), wall seconds; and how many
   answers end within 48, 96 and 128 tokens (one greedy run at the largest limit, each answer's length).
2. ``robustft report`` (``run_report``) for a LoRA adapter (the demo's LoRA shape, r=8 on every linear layer;
   random B: the cost does not depend on its values) with that retention set cached: id and shifted sets
   of ``--n-eval`` WordNet definitions, 5 α. Wall seconds per run (loading included) and the evaluation
   alone (``report.inputs["eval_seconds"]``), median and range over ``--repeats`` runs.
3. ``ForgettingCallback``'s overhead per evaluation: the same ``Trainer.evaluate`` on the id set (the demo's
   LoRA ``SFTTrainer``) without the callback, with it scoring the retained loss only, and with loss and KL
   (its default). The three are interleaved (the order rotates every round), ``--repeats`` rounds; each
   evaluation is at a new ``global_step``, so the callback scores every time. Medians, ranges, the ratio to
   the same round's evaluation without it, and the seconds it adds.

On a machine shared with other jobs single timings vary by several times (FACTS.md): the load average
before and after is printed with the tables. The functions take a model folder and rows, so the tests run
them on a tiny Llama (tests/test_benchmarks_forgetting.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from robustft.demos.console import format_table  # noqa: E402

START, END = "<!-- forgetting-benchmark:start -->", "<!-- forgetting-benchmark:end -->"
LIMITS = (48, 96, 128)
VARIANTS = ("without", "loss", "loss+kl")


def threads() -> int:
    import torch

    return torch.get_num_threads()


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of timings, in seconds."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def retention_generation(model_dir: str | os.PathLike, prompts: Sequence[str], path: Path,
                         max_new_tokens: int) -> dict:
    """Build the retention set from scratch (saved at ``path``): wall seconds, rows kept and left out."""
    from robustft.analysis.retention import build_retention_set

    t0 = time.perf_counter()
    rset = build_retention_set(model_dir, prompts, path, max_new_tokens, rebuild=True)
    return {"seconds": time.perf_counter() - t0, "rows": len(rset.rows), "unfinished": len(rset.unfinished),
            "max_new_tokens": max_new_tokens}


def finish_counts(model_dir: str | os.PathLike, prompts: Sequence[str], limits: Sequence[int] = LIMITS,
                  batch_size: int = 16) -> dict[int, int]:
    """How many greedy answers end within each limit (one run at the largest; greedy steps do not depend on
    the limit)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from robustft.analysis.retention import end_of_answer_id, generate_answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lengths: list[int | None] = []
    generate_answers(model, tokenizer, prompts, max(limits), end_of_answer_id(tokenizer, model_dir),
                     batch_size, lengths=lengths)
    return {n: sum(1 for k in lengths if k is not None and k <= n) for n in limits}


def save_random_adapter(model_dir: str | os.PathLike, folder: Path, rank: int = 8) -> Path:
    """A LoRA adapter of the demo's shape (r on every linear layer) with random B, saved in ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def report_timing(model_dir: str | os.PathLike, adapter: Path, id_path: Path, shift_path: Path,
                  retention: Path, out: Path, repeats: int) -> dict:
    """``run_report`` ``repeats`` times with the cached retention set: total and evaluation seconds."""
    from robustft.analysis.report import run_report

    total, evals, report = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = run_report(model_dir, id_path, out, adapter=adapter, shift_path=shift_path,
                            retention_path=retention, overwrite=True, say=lambda *a: None)
        total.append(time.perf_counter() - t0)
        evals.append(report.inputs["eval_seconds"])
    return {"total": total, "eval": evals, "alphas": len(report.alphas), "n_items": report.n_items,
            "n_tokens": report.n_tokens}


def per_token_ms(rep: dict) -> float:
    """Median evaluation milliseconds per answer token and α: what a report costs per eval token."""
    return 1000 * statistics.median(rep["eval"]) / (sum(rep["n_tokens"].values()) * rep["alphas"])


def callback_overhead(make_trainer: Callable[[list], object], retention: Path, repeats: int,
                      eval_name: str = "id") -> dict[str, list[float]]:
    """Seconds of ``trainer.evaluate(eval_name)`` per variant (without the callback, loss, loss+KL),
    interleaved with a rotating order, ``repeats`` rounds; one Trainer, the callbacks attached in turn."""
    from robustft import ForgettingCallback

    callbacks = {"loss": ForgettingCallback(retention, metrics="loss"),
                 "loss+kl": ForgettingCallback(retention)}
    trainer = make_trainer(list(callbacks.values()))
    for cb in callbacks.values():
        trainer.remove_callback(cb)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up, not timed: first-call costs, each callback's encoding of the set
        _timed_evaluate(trainer, callbacks.get(v), eval_name)
    for r in range(repeats):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
            seconds[v].append(_timed_evaluate(trainer, callbacks.get(v), eval_name))
    return seconds


def _timed_evaluate(trainer, callback, eval_name: str) -> float:
    """Seconds of one ``trainer.evaluate`` at a new step with ``callback`` attached (None: without)."""
    if callback is not None:
        trainer.add_callback(callback)
    trainer.state.global_step += 1  # a new evaluation step: the callback scores again
    try:
        t0 = time.perf_counter()
        metrics = trainer.evaluate(eval_dataset=eval_name)
        seconds = time.perf_counter() - t0
    finally:
        if callback is not None:
            trainer.remove_callback(callback)
    if callback is not None and "eval_retained_loss" not in metrics:
        raise RuntimeError(f"ForgettingCallback did not score: {sorted(metrics)}")
    return seconds


def overhead_table(seconds: dict[str, list[float]]) -> str:
    """Per variant: evaluate() seconds (median, range), ratio to the same round's run without the callback
    (median, range) and the median seconds added."""
    base = seconds["without"]
    rows = []
    for v, s in seconds.items():
        ratio = [a / b for a, b in zip(s, base)]
        added = [a - b for a, b in zip(s, base)]
        rows.append([v, spread(s), f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}x)",
                     f"{statistics.median(added):+.2f}"])
    return format_table(["ForgettingCallback", "evaluate() s, median (range)", "ratio to without",
                         "s added (median)"], rows)


def section(gen: dict | None, counts: dict[int, int] | None, n_prompts: int, rep: dict | None,
            over: dict | None, command: str, loads: tuple[float, float]) -> str:
    """The Markdown section written between the markers of docs/benchmarks.md."""
    parts = ["## Forgetting: `robustft report` and `ForgettingCallback` on SmolLM2-135M-Instruct", "",
             f"Command: `{command}`. Load average {loads[0]:.1f} at start, {loads[1]:.1f} at the end, on "
             f"{os.cpu_count()} cores, torch threads {threads()} (a load above ~1 per core means other jobs "
             "were running: read the medians and ranges)."]
    if counts is not None:
        parts += ["", f"Answers of the base model that end within the limit, of the {n_prompts} shipped "
                  "prompts (greedy): " + ", ".join(f"{n} tokens: {k}" for n, k in counts.items()) + "."]
    if gen is not None:
        parts += ["", f"Retention set, built once: {gen['seconds']:.1f} s ({gen['rows']} answers kept, "
                  f"{gen['unfinished']} unfinished within {gen['max_new_tokens']} tokens)."]
    if rep is not None:
        parts += ["", f"`robustft report --adapter` with that set cached, {rep['alphas']} α, "
                  f"{len(rep['total'])} runs: {spread(rep['total'])} s in all (loading included), "
                  f"{spread(rep['eval'])} s evaluating; items {rep['n_items']}, answer tokens "
                  f"{rep['n_tokens']}: {per_token_ms(rep):.1f} ms per answer token and α (one forward pass "
                  "per batch and α, the base pass shared)."]
    if over is not None:
        parts += ["", f"ForgettingCallback per evaluation ({len(over['without'])} interleaved rounds):", "",
                  overhead_table(over)]
    return "\n".join(parts)


def smollm2_setup(n_eval: int, seed: int = 0):
    """(model folder, id rows, shifted rows, train rows, tokenizer) of the LLM demo's task on SmolLM2."""
    from transformers import AutoTokenizer

    from robustft.demos import llm as demo_llm

    model_dir = demo_llm.model_path()
    task = demo_llm.make_definition_task(demo_llm.wordnet_dir(), 32, n_eval, seed)
    return model_dir, task["id"], task["shifted"], task["train"], AutoTokenizer.from_pretrained(model_dir)


def demo_trainer_factory(model_dir: Path, tokenizer, train_rows, id_rows,
                         out: Path) -> Callable[[list], object]:
    """``callbacks -> the demo's LoRA SFTTrainer`` with the id set to evaluate."""
    from datasets import Dataset

    from robustft.demos import llm as demo_llm

    task = demo_llm.LLMTask(Path(model_dir), tokenizer, Dataset.from_list(list(train_rows)),
                            {"id": Dataset.from_list(list(id_rows))})
    cfg = demo_llm.LLMDemoConfig(steps=1)
    return lambda callbacks: demo_llm.lora_trainer(task, cfg, out, callbacks, eval_dataset=task.evals,
                                                   trainer_logs=False)


def run(model_dir, prompts, id_rows, shift_rows, train_rows, tokenizer, out: Path, repeats: int,
        max_new_tokens: int, limits: Sequence[int] | None = LIMITS, overhead: bool = True) -> dict:
    """Every measurement on ``model_dir`` (the callback's overhead unless not ``overhead``); the results as
    a dict (``section`` formats them)."""
    out.mkdir(parents=True, exist_ok=True)
    retention = out / "retention.jsonl"
    result = {"gen": retention_generation(model_dir, prompts, retention, max_new_tokens)}
    result["counts"] = finish_counts(model_dir, prompts, limits) if limits else None
    adapter = save_random_adapter(model_dir, out / "adapter")
    result["report"] = report_timing(model_dir, adapter, write_rows(out / "id.jsonl", id_rows),
                                     write_rows(out / "shift.jsonl", shift_rows), retention, out / "report",
                                     repeats)
    result["overhead"] = None
    if overhead:
        make = demo_trainer_factory(model_dir, tokenizer, train_rows, id_rows, out / "trainer")
        result["overhead"] = callback_overhead(make, retention, repeats)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=100, help="the first N shipped prompts (default all 100)")
    p.add_argument("--n-eval", type=int, default=96, help="WordNet definitions per eval set (id, shifted)")
    p.add_argument("--repeats", type=int, default=5, help="report runs; interleaved evaluate() rounds")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer limit (default: the library's)")
    p.add_argument("--skip-finish-counts", action="store_true", help="skip the 48/96/128-token counts")
    p.add_argument("--skip-overhead", action="store_true",
                   help="skip ForgettingCallback's overhead (with --no-write only: the section holds it)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_forgetting_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    if args.skip_overhead and not args.no_write:
        p.error("--skip-overhead: only with --no-write (the written section holds the overhead table)")
    import torch

    from robustft.analysis.retention import MAX_NEW_TOKENS, general_prompts

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    command = "python benchmarks/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load0 = os.getloadavg()[0]
    prompts = general_prompts()[: args.prompts]
    model_dir, id_rows, shift_rows, train_rows, tok = smollm2_setup(args.n_eval)
    res = run(model_dir, prompts, id_rows, shift_rows, train_rows, tok, Path(args.out), args.repeats,
              args.max_new_tokens or MAX_NEW_TOKENS, None if args.skip_finish_counts else LIMITS,
              not args.skip_overhead)
    text = section(res["gen"], res["counts"], len(prompts), res["report"], res["overhead"], command.strip(),
                   (load0, os.getloadavg()[0]))
    from benchmarks.llm import publish

    return publish(text, args.no_write, START, END)


if __name__ == "__main__":
    sys.exit(main())
