"""Strength sweeps of training-time methods on the demo tasks (issue 28), with WiSE-FT on each run.

    python benchmarks/strength.py --task topics --methods L2-SP EWC     # one JSON per method, then the doc
    python benchmarks/strength.py --task glosses --methods L2-SP EWC
    python benchmarks/strength.py --task llm --methods plain L2-SP EWC  # LoRA on SmolLM2 (demo --llm, FAST)
    python benchmarks/strength.py --task topics --report-only           # rebuild the doc from the JSONs

Every method is swept with ``robustft.analysis.strength.strength_sweep`` over the grids of ``factories``
(the docs' setting times 0.01, 0.1 and 1 for the anchor penalties; one untuned setting for the others), from
the same zero-shot start with the demo's data and budget (``benchmarks/robustness.py``'s ``demo_task``,
``make_trainer``). The strength is chosen on ``id`` at the end points, then WiSE-FT's α (``ALPHAS``) on ``id``
on the chosen run (``wise_ft="chosen"``; plain fine-tuning: its α curve, ``"each"``); ``id_test`` and
``shifted`` are reported. Each method's curve is saved as ``<out>/<task>/<method>.json`` (+ CSV, PNG) as soon
as it is done; the table is built from the JSONs present and written between
``<!-- strength-<task>:start/end -->`` in docs/regularizers.md and docs/benchmarks.md.

``--task llm``: the ``robustft demo --llm`` task in its fast setting (``robustft.demos.llm``'s
``prepare_llm_task``, ``lora_trainer``), L2-SP and EWC on the LoRA factors (anchor: the adapter at train
begin, B = 0) at λ = ``scales`` (EWC: times 1/mean(F), F on the training examples); the metric is the mean
answer-token loss (lower is better), chosen on ``id``, with ``shifted`` and ``retained`` reported;
``--budget ε``: chosen on ``id`` among the strengths whose retained loss is at most the base model's + ε
(``strength_sweep(budget=...)``, the α rule's ``AlphaBudget``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.llm import write_section  # noqa: E402
from benchmarks.robustness import Task, demo_task, fisher_of_start, make_trainer, pct  # noqa: E402
from robustft.demos import llm as demo_llm  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
EVALS = ("id", "id_test", "shifted")  # "id" chooses α and the strength; the other two are reported
LLM_EVALS = ("id", "shifted", "retained")  # the LLM task's (mean answer-token loss)
LLM_METHODS = ("plain", "L2-SP", "EWC", "spectral", "EMA", "Momentum-SAM")  # on LoRA (LP-FT: no head)
WISE_FT = {"plain": "each"}  # plain fine-tuning: its α curve (the WiSE-FT row); the others: ``--wise-ft``
SCALES = (0.01, 0.1, 1.0)  # the anchor penalties' strengths, times the docs' setting
METHODS = ("plain", "L2-SP", "EWC", "spectral", "LP-FT", "EMA", "SAM", "Momentum-SAM",
           "shrink-perturb")  # the table's order


Sweep = tuple[list[float], Callable[[float], list], str]  # strengths, strength -> callbacks, their meaning


@dataclass
class Bench:
    """What a sweep needs of a task: fresh trainers, the methods' sweeps, the eval sets and their metric."""

    trainer: Callable[[Path, list], Any]  # (output folder, callbacks) -> a Trainer on a fresh start model
    factories: dict[str, Callable[[], Sweep]]
    evals: dict
    description: str
    metric: str = "accuracy"
    greater_is_better: bool = True


def encoder_bench(task: Task, scales=SCALES) -> Bench:
    """An encoder demo task (``benchmarks.robustness.demo_task``) as a :class:`Bench`."""
    return Bench(lambda folder, callbacks: make_trainer(task, task.start(), folder, callbacks),
                 factories(task, scales), {e: task.evals[e] for e in EVALS}, task.description)


def llm_bench(task, cfg, out: Path, scales=SCALES) -> Bench:
    """The LLM demo task (``demo_llm.prepare_llm_task``; LoRA trainers of ``demo_llm.lora_trainer``) as a
    :class:`Bench`: L2-SP at λ = ``scales``, EWC at ``scales`` / mean(F) with F on the LoRA factors."""
    import torch

    from robustft import EMACallback, EWCCallback, L2SPCallback, MomentumSAMCallback, SpectralRegCallback
    from robustft.merge import estimate_fisher

    def trainer(folder: Path, callbacks: list):
        return demo_llm.lora_trainer(task, cfg, folder, callbacks)

    def ewc() -> Sweep:  # on the fresh adapter's factors (same names in every run: the seed is the demo's)
        t0 = time.perf_counter()
        start = trainer(out / "fisher", [])
        fisher = estimate_fisher(start.model, start.get_train_dataloader(), max_examples=cfg.n_train)
        seconds = time.perf_counter() - t0
        mean = float(torch.cat([f.flatten() for f in fisher.values()]).mean())
        print(f"Fisher of the start adapter: {seconds:.1f} s, mean {mean:.3g}", flush=True)
        return ([round(c / mean, 6) for c in scales], lambda s: [EWCCallback(s, fisher=fisher)],
                f"λ (1/mean(F) = {1 / mean:.4g}; F on the LoRA factors from {cfg.n_train} training examples, "
                f"{seconds:.0f} s)")

    sweeps = {
        "plain": lambda: ([0.0], lambda s: [], "-"),
        "L2-SP": lambda: (list(scales), lambda s: [L2SPCallback(s)],
                          "λ, loss form, on the LoRA factors (anchor: the adapter at train begin, B = 0)"),
        "EWC": ewc,
        "spectral": lambda: (list(scales), lambda s: [SpectralRegCallback(s)],
                             "λ, σ₁ of every LoRA factor held at its start value (B: 0, so on B a pull of "
                             "σ₁(B) toward 0; the paper's σ₁ is the layer's whole weight's)"),
        "EMA": lambda: ([0.5, 0.75, 0.9],  # no warm-up: in 8 steps it caps β at 0.77 (0.9 = 0.98 there)
                        lambda s: [EMACallback(decay=s, copy_to_model_at_end=True, save_dir=None)],
                        f"decay β ({cfg.steps} steps, no warm-up, which would cap β at 0.77 in 8 steps; the "
                        f"demo: {cfg.ema_decay:g} with warm-up), EMA of the adapter left in the model"),
        "Momentum-SAM": lambda: ([0.1, 0.3, 1.0], lambda s: [MomentumSAMCallback(rho=s)],
                                 f"ρ on the adapter (the demo's: {cfg.msam_rho:g})"),
    }
    n = {s: len(task.evals[s]) for s in LLM_EVALS}
    description = (f"`robustft demo --llm` fast setting: SmolLM2-135M-Instruct, LoRA r={cfg.rank} on all "
                   f"linear layers, {cfg.n_train} WordNet glosses, {cfg.steps} steps of batch "
                   f"{cfg.batch_size} at lr {cfg.learning_rate:g}, {n['id']}/{n['shifted']}/{n['retained']} "
                   f"id/shifted/retained sequences, seed {cfg.seed}")
    return Bench(trainer, sweeps, {s: task.evals[s] for s in LLM_EVALS}, description, metric="loss",
                 greater_is_better=False)


def factories(task: Task, scales=SCALES) -> dict[str, Callable[[], Sweep]]:
    """Method -> () -> its sweep; the anchor penalties' strengths are ``scales`` times the docs' setting
    (λ = 1, and 1/mean(F) for EWC, whose Fisher is estimated once)."""
    import torch

    from robustft import (
        EMACallback,
        EWCCallback,
        L2SPCallback,
        LPFTCallback,
        SAMCallback,
        ShrinkPerturbCallback,
        SpectralRegCallback,
    )

    def ewc() -> Sweep:
        fisher, seconds = fisher_of_start(task)
        mean = float(torch.cat([f.flatten() for f in fisher.values()]).mean())
        print(f"Fisher of the start: {seconds:.1f} s, mean {mean:.3g}", flush=True)
        return ([round(c / mean, 6) for c in scales],
                lambda s: [EWCCallback(s, fisher=fisher)],
                f"λ (1/mean(F) = {1 / mean:.4g}; Fisher {seconds:.0f} s)")

    return {
        "plain": lambda: ([0.0], lambda s: [], "-"),
        "L2-SP": lambda: (list(scales), lambda s: [L2SPCallback(s)], "λ, loss form"),
        "EWC": ewc,
        "spectral": lambda: (list(scales), lambda s: [SpectralRegCallback(s, include=r"\.layer\.\d+\.")],
                             "λ, σ₁ of the encoder-layer matrices held at their start values"),
        "LP-FT": lambda: ([1.0], lambda s: [LPFTCallback(probe_epochs=int(s))], "probe epochs (of 2)"),
        "EMA": lambda: ([0.5, 0.9, 0.99],
                        lambda s: [EMACallback(decay=s, copy_to_model_at_end=True, save_dir=None)],
                        "decay β (26 steps), EMA weights left in the model"),
        "SAM": lambda: ([0.01, 0.05, 0.2], lambda s: [SAMCallback(rho=s)], "ρ"),
        "shrink-perturb": lambda: ([0.9, 0.99, 0.999],
                                   lambda s: [ShrinkPerturbCallback(shrink=s, sigma=1e-3, every_n_steps=10,
                                                                    seed=task.seed)],
                                   "shrink λ every 10 steps, σ = 1e-3 (the robustness benchmark's: 0.99)"),
    }


def run_method(task: Task | Bench, method: str, out: Path, wise_ft: str | None = None,
               scales=SCALES, budget: float | None = None) -> Path:
    """One method's sweep (WiSE-FT on every run), saved as ``out/<method>.json``; returns that path.
    ``budget``: ε of a retained-loss budget (the LLM task's ``retained`` set)."""
    from robustft.analysis.strength import strength_sweep

    bench = task if isinstance(task, Bench) else encoder_bench(task, scales)
    strengths, make_callback, meaning = bench.factories[method]()
    run = {"i": 0}

    def trainer_of(callbacks: list):
        run["i"] += 1
        return bench.trainer(out / f"{method}_{run['i']}", callbacks)

    t0 = time.perf_counter()
    curve = strength_sweep(trainer_of, make_callback, strengths, bench.evals, "id", metric=bench.metric,
                           greater_is_better=bench.greater_is_better, name=method,
                           wise_ft=WISE_FT.get(method, wise_ft), alphas=ALPHAS, output_dir=out, plot=True,
                           budget=None if budget is None else {"dataset": "retained", "epsilon": budget})
    data = curve.as_dict()
    data.update(meaning=meaning, seconds=time.perf_counter() - t0,
                load=os.getloadavg()[0], description=bench.description)
    path = out / f"{method}.json"
    path.write_text(json.dumps(data, indent=2))  # overwrites strength_sweep's own JSON with the extras
    print(curve.table(), flush=True)
    return path


def score_text(data: dict) -> Callable[[float], str]:
    """How one JSON's metric is printed: accuracy in %, a loss to 4 decimals."""
    return pct if data["greater_is_better"] else (lambda x: f"{x:.4f}")


def rows_of(data: dict) -> list[list[str]]:
    """Table rows of one method's JSON: per strength, the end point, θ(α*) where swept, and the train time."""
    evals, fmt, rows = list(data["results"]), score_text(data), []
    for i, s in enumerate(data["strengths"]):
        wise = data["wise_ft"].get(f"{s:g}")
        at = None if wise is None else wise["chosen_alpha"]
        end = {d: data["results"][d][i] for d in evals}
        if data["alphas"][i] is not None:  # wise_ft="each": the results are θ(α*)'s, the end point is α = 1
            end = {d: wise["results"][d][wise["alphas"].index(1.0)] for d in evals}
        best = {} if wise is None else {d: wise["results"][d][wise["alphas"].index(at)] for d in evals}
        rows.append([data["axis"], f"{s:.4g}", *(fmt(end[d]) for d in evals),
                     "-" if at is None else f"{at:g}",
                     *(fmt(best[d]) if best else "-" for d in evals[1:]), f"{data['train_seconds'][i]:.0f}",
                     ("chosen on id" + (" under the budget" if data.get("rule") == "budget" else ""))
                     if s == data["chosen_strength"] and len(data["strengths"]) > 1 else ""])
    return rows


def section(task_name: str, out: Path, command: str, per_method: bool = True) -> str:
    """The markdown of every method's JSON present in ``out``: command, meaning of columns, table.
    ``per_method``: the methods ran as one process each (else in the one process of ``command``)."""
    found = [m for m in METHODS if (out / f"{m}.json").exists()]
    datas = {m: json.loads((out / f"{m}.json").read_text()) for m in found}
    rows = [r for m in found for r in rows_of(datas[m])]
    first = next(iter(datas.values()), {"description": "", "results": dict.fromkeys(EVALS),
                                        "greater_is_better": True})
    evals, loss = list(first["results"]), not first["greater_is_better"]
    loads = ", ".join(f"{m} {d['load']:.1f}" for m, d in datas.items())
    meanings = "; ".join(f"{m}: {d['meaning']}" for m, d in datas.items() if d["meaning"] != "-")
    how = ", one process per method side by side, then `--report-only`" if per_method else ""
    units = ("Mean answer-token loss, lower is better (retained: the base model's own answers to general "
             "prompts). `end`: the run's end point (α = 1). The strength is chosen on the lowest `id` loss "
             "at the end points (ties: the smaller strength)." if loss else
             "Accuracy in %. `end`: the run's end point (α = 1). The strength is chosen on `id` at the end "
             "points (ties: lower id loss, then the smaller strength).")
    if first.get("rule") == "budget":
        units += (f" Under the budget: only the strengths whose retained loss is at most the base model's "
                  f"({first['budget_start']:.4f}) + {first['budget']['epsilon']:g} compete (none: the one "
                  "closest to it, with a warning).")
    return "\n".join([
        f"### Measured: strength sweeps on the {task_name} task (issue 28)", "",
        f"Command: `{command}`{how} ({first['description']}; one run per strength, one seed; load average at "
        f"the end of each method: {loads}, on 2 cores shared with other sessions' work, so train seconds are "
        "noisy).", "",
        units + " `α*` and `at α*`: WiSE-FT's α ∈ "
        f"{{{', '.join(f'{a:g}' for a in ALPHAS)}}} chosen on `id`, where it ran (plain fine-tuning: its own "
        "curve, the WiSE-FT row; the others only with `--wise-ft`, off here: the α sweep's evaluations "
        "cost as much as a training run). `train s`: wall seconds of `train()`. Strengths: " + meanings + ".",
        "",
        format_table(["method", "strength", *(f"{d} end" for d in evals), "α*",
                      *(f"{d} at α*" for d in evals[1:]), "train s", "choice"], rows),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("topics", "glosses", "llm"), default="topics",
                   help="llm: robustft demo --llm in its fast setting (LoRA on SmolLM2-135M-Instruct)")
    p.add_argument("--methods", nargs="+", default=["plain", "L2-SP", "EWC"],
                   choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=300, help="examples per eval set (the demo's: 300)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_strength_benchmark"))
    p.add_argument("--wise-ft", choices=("none", "chosen", "each"), default="none",
                   help="WiSE-FT's α sweep on no run (default; the evaluations cost as much as training), "
                   "the chosen run, or every run")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                   help="the anchor penalties' strengths, times the docs' setting")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the saved JSONs")
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    p.add_argument("--budget", type=float, default=None, metavar="EPS",
                   help="llm: choose among the strengths whose retained loss is <= the base model's + EPS")
    args = p.parse_args(argv)
    if args.budget is not None and args.task != "llm":
        p.error("--budget: only with --task llm (the retained set is the LLM task's)")
    if args.task == "llm" and set(args.methods) - set(LLM_METHODS):
        p.error(f"--methods: the llm task runs {', '.join(LLM_METHODS)} only, got "
                f"{', '.join(sorted(set(args.methods) - set(LLM_METHODS)))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if args.task == "llm":
            cfg = replace(demo_llm.FAST, seed=args.seed)
            task = llm_bench(demo_llm.prepare_llm_task(cfg), cfg, out, args.scales)
        else:
            task = demo_task(args.seed, n_eval=args.n_eval, task=args.task)
        for method in args.methods:
            print(f"== {method}", flush=True)
            run_method(task, method, out, None if args.wise_ft == "none" else args.wise_ft, args.scales,
                       args.budget)
    name = {"topics": "`robustft demo`", "glosses": "`robustft demo --task glosses`",
            "llm": "`robustft demo --llm`"}[args.task]
    threads = f" --threads {args.threads}" if args.threads else ""
    methods = " ".join(args.methods) if args.task == "llm" else "<method>"
    scales = "" if tuple(args.scales) == SCALES else " --scales " + " ".join(f"{c:g}" for c in args.scales)
    budget = "" if args.budget is None else f" --budget {args.budget:g}"
    command = (f"python benchmarks/strength.py --task {args.task} --methods {methods}{scales}{threads}"
               f"{budget} --out {args.out}")
    text = section(name, out, command, per_method=args.task != "llm")
    print(text)
    if not args.no_write:
        start, end = f"<!-- strength-{args.task}:start -->", f"<!-- strength-{args.task}:end -->"
        for doc in ("regularizers.md", "benchmarks.md"):
            write_section(text, ROOT / "docs" / doc, start, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
