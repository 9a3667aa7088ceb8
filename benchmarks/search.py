"""Merge-coefficient search on the demo's encoder tasks: a 3-model task-arithmetic merge, weights chosen by
``robustft.merge.search.search_merge`` (TPE, CMA-ES, a grid) against the default weights, offline on CPU.

    python benchmarks/search.py                 # 400 train / 300 eval, 2 epochs, 27 trials; an hour loaded
    python benchmarks/search.py --n-train 200 --n-eval 150 --epochs 1 --budget 12  # recorded (40 min)
    python benchmarks/search.py --task glosses --n-train 200 --n-eval 150 --epochs 1 --budget 12
    python benchmarks/search.py --task llm --budget 6   # time per trial on SmolLM2-135M (merge vs eval)
    python benchmarks/search.py --no-write      # print only
    python benchmarks/search.py --n-train 160 --epochs 1 --budget 6     # a smoke run

Models: the demo's zero-shot start (all-MiniLM-L6-v2 with the label descriptions as its head,
``robustft.demos.encoder.zero_shot_start``) and three fine-tuned copies (Trainer, 2 epochs) that differ in
seed, training subset (``make_task`` seeds 10/20/30) and learning rate (5e-5, 3e-5, 8e-5). Every search
chooses on the in-distribution split ``id`` only (accuracy, ``trainer.evaluate``); the held-out ``id_test``
and the ``shifted`` split (the spurious tag points to a wrong label) are scored once, for the chosen merge.
Each row states the evaluations it used. Per-trial time is split into the in-memory merge and the
evaluation (medians over the trials).

``--task glosses`` (``robustft demo --task glosses``): the three copies train on three 75% subsets of the
task's training split (data seeds 10/20/30; the WordNet eval splits are drawn once, so no copy sees an eval
gloss). ``--task llm``: the time per trial on SmolLM2-135M-Instruct (``robustft demo --llm``'s fast task):
three LoRA runs of the demo (seeds 0/1/2, 8 steps) merged into full checkpoints, a 3-model task-arithmetic
search over the weights on the mean answer-token loss of the demo's ``id`` set (lower is better), the
in-memory merge and the evaluation timed per trial.

The section between the ``search-benchmark`` markers in ``docs/benchmarks.md`` is replaced with the result
and the command (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FINETUNES = [(0, 10, 5e-5), (1, 20, 3e-5), (2, 30, 8e-5)]  # (seed, data seed, learning rate)


def save(model, folder: Path) -> Path:
    """The model's tensors as ``folder/model.safetensors``; a tied tensor once (under its first name)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            tensors[k] = v.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def llm_trial_time(args) -> None:
    """Time per trial of a 3-model task-arithmetic search on SmolLM2-135M: in-memory merge vs evaluation."""
    from dataclasses import replace

    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from robustft.demos import llm as demo_llm
    from robustft.merge.io import load_checkpoints
    from robustft.merge.search import SearchParam, search_merge, trainer_objective

    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="search-llm-"))
    cfg = demo_llm.FAST
    task = demo_llm.prepare_llm_task(cfg, verbose=False)
    t0 = time.perf_counter()
    dirs = []
    for seed in (0, 1, 2):
        trainer = demo_llm.lora_trainer(task, replace(cfg, seed=seed), work / f"run{seed}")
        trainer.train()
        dirs.append(save(trainer.model.merge_and_unload(), work / f"ft{seed}"))
    ft_seconds = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32)
    base = save(model, work / "start")
    trainer = SFTTrainer(model=model, args=demo_llm.sft_config(work / "eval", cfg), train_dataset=task.train,
                         processing_class=task.tokenizer)
    objective = trainer_objective(trainer, task.evals["id"], "loss")
    cached = load_checkpoints([base, *dirs])
    memory = sum(c.memory_bytes() for c in cached.values()) / 2**20
    del cached
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}
    t0 = time.perf_counter()
    r = search_merge(recipe, model, objective, [SearchParam("weight", 0.0, 1.0)], work / "tpe",
                     greater_is_better=False, sampler="tpe", n_trials=args.budget, progress=False,
                     metric_name="id loss")
    seconds = time.perf_counter() - t0
    merge = [t["merge_s"] for t in r.trials]
    evals = [t["eval_s"] for t in r.trials]
    n_id = len(task.evals["id"])
    weights = ", ".join(f"{r.best_params[f'models[{i}].weight']:.3g}" for i in range(3))
    text = "\n".join([
        f"Command: `python benchmarks/search.py --task llm --budget {args.budget}` (SmolLM2-135M-Instruct, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M elements; three LoRA runs of "
        "`robustft demo --llm`'s fast setting, seeds 0/1/2, merged into full float32 checkpoints; a 3-model "
        f"task-arithmetic search over the weights, TPE, {args.budget} trials, on the mean answer-token loss "
        f"of the demo's `id` set, {n_id} sequences; CPU, 2 threads, load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        "| per trial | median s | range s |",
        "|---|---|---|",
        f"| in-memory merge (task arithmetic, tensors loaded once) | {statistics.median(merge):.2f} | "
        f"{min(merge):.2f}-{max(merge):.2f} |",
        f"| evaluation (`trainer.evaluate`, {n_id} sequences) | {statistics.median(evals):.2f} | "
        f"{min(evals):.2f}-{max(evals):.2f} |",
        "",
        f"The merge is {100 * statistics.median(m / (m + e) for m, e in zip(merge, evals)):.0f}% of a trial "
        f"(median); the search took {seconds:.0f} s for {r.evaluations} evaluations, best id loss "
        f"{r.best_value:.4f} (weights {weights}). "
        f"Inputs held in memory {memory:.0f} MiB (start + 3 fine-tuned, float32); the three LoRA runs and "
        f"their merges into full checkpoints took {ft_seconds:.0f} s.",
    ])
    print(text)
    if not args.no_write:
        from benchmarks.llm import write_section

        marker = "search-benchmark-llm"
        write_section(text, start=f"<!-- {marker}:start -->", end=f"<!-- {marker}:end -->")


def finetune(root: Path, args) -> tuple[Path, list[Path], float]:
    """The zero-shot start and three fine-tuned copies, saved as safetensors folders; seconds spent."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    from robustft.demos.encoder import encode_splits, make_task, training_arguments, zero_shot_start

    t0 = time.perf_counter()
    model, tok = zero_shot_start(0, args.task)
    base = save(model, root / "start")
    if args.task == "glosses":
        train, _ = encode_splits(tok, 0, args.n_train, args.n_eval, "glosses")
    dirs = []
    for seed, data_seed, lr in FINETUNES:
        model, tok = zero_shot_start(seed, args.task)
        if args.task == "glosses":  # a 75% subset of the one training split: no eval gloss is trained on
            ds = train.shuffle(seed=data_seed).select(range(3 * len(train) // 4))
        else:
            ds = Dataset.from_dict(make_task(args.n_train, data_seed))
            ds = ds.map(lambda b, tok=tok: tok(b["text"], truncation=True, max_length=64), batched=True)
            ds = ds.rename_column("label", "labels").remove_columns(["text"])
        targs = training_arguments(root / f"run{seed}", seed, args.epochs, lr, progress=False)
        Trainer(model=model, args=targs, train_dataset=ds, data_collator=DataCollatorWithPadding(tok)).train()
        dirs.append(save(model, root / f"ft{seed}"))
    return base, dirs, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("topics", "glosses", "llm"), default="topics")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--budget", type=int, default=27, help="trials of TPE and CMA-ES (the grid: 3^3 = 27)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.task == "llm":
        return llm_trial_time(args)

    import torch
    from transformers import DataCollatorWithPadding, Trainer

    from robustft.demos.encoder import accuracy, encode_splits, training_arguments, zero_shot_start
    from robustft.merge.engine import merged_tensors
    from robustft.merge.io import load_checkpoints
    from robustft.merge.recipe import parse_recipe
    from robustft.merge.search import SearchParam, load_into_model, search_merge, trainer_objective

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="search-bench-"))
    base, dirs, ft_seconds = finetune(work, args)
    model, tok = zero_shot_start(0, args.task)
    _, evals = encode_splits(tok, 0, 8 if args.task == "topics" else args.n_train, args.n_eval, args.task)
    trainer = Trainer(model=model, args=training_arguments(work / "eval", progress=False),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    objective = trainer_objective(trainer, evals["id"], "accuracy")
    cached = load_checkpoints([base, *dirs])
    memory = sum(c.memory_bytes() for c in cached.values()) / 2**20
    del cached

    def recipe(weights=None) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": str(base),
                "models": [{"model": str(d), "parameters": {"weight": 1.0 if weights is None else w}}
                           for d, w in zip(dirs, weights or [1.0] * 3, strict=True)]}

    def scores() -> dict:
        out = {}
        for split in ("id", "id_test", "shifted"):
            out[split] = trainer.evaluate(evals[split], metric_key_prefix=split)[f"{split}_accuracy"]
        return out

    rows, timing = [], {}

    def fixed(name: str, weights: list[float]) -> None:
        """One merge with the given weights (streamed, as robustft merge): one evaluation on id."""
        t0 = time.perf_counter()
        load_into_model(model, merged_tensors(parse_recipe(recipe(weights))))
        rows.append({"method": name, "evaluations": 1, "weights": weights, **scores(),
                     "seconds": time.perf_counter() - t0})

    for k in range(len(dirs)):
        fixed(f"fine-tuned model {k} alone", [1.0 if i == k else 0.0 for i in range(3)])
    fixed("default weights (1, 1, 1)", [1.0, 1.0, 1.0])
    fixed("uniform weights (1/3 each)", [1 / 3] * 3)

    for name, sampler, n, points in (("grid 3x3x3 {0, 0.5, 1}", "grid", 27, 3),
                                     (f"TPE, {args.budget} trials", "tpe", args.budget, 5),
                                     (f"CMA-ES, {args.budget} trials", "cmaes", args.budget, 5)):
        t0 = time.perf_counter()
        r = search_merge(recipe(), model, objective, [SearchParam("weight", 0.0, 1.0)], work / sampler,
                         sampler=sampler, grid_points=points, n_trials=n, progress=False,
                         metric_name="id accuracy")
        seconds = time.perf_counter() - t0
        timing[sampler] = (statistics.median(t["merge_s"] for t in r.trials),
                           statistics.median(t["eval_s"] for t in r.trials))
        weights = [round(r.best_params[f"models[{i}].weight"], 3) for i in range(3)]
        rows.append({"method": name, "evaluations": r.evaluations, "weights": weights, **scores(),
                     "seconds": seconds})

    print_and_write(rows, timing, memory, ft_seconds, args)


def print_and_write(rows, timing, memory, ft_seconds, args) -> None:
    lines = ["| weights chosen by | evaluations (id) | weights | id | id_test | shifted | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = ", ".join(f"{x:.3g}" for x in r["weights"])
        lines.append(f"| {r['method']} | {r['evaluations']} | {w} | {100 * r['id']:.1f} | "
                     f"{100 * r['id_test']:.1f} | {100 * r['shifted']:.1f} | {r['seconds']:.0f} |")
    merge_s = statistics.median(m for m, _ in timing.values())
    eval_s = statistics.median(e for _, e in timing.values())
    load = os.getloadavg()[0]
    cmd = "python benchmarks/search.py" + ("" if args.task == "topics" else f" --task {args.task}")
    if not argv_default(args):
        cmd += (f" --n-train {args.n_train} --n-eval {args.n_eval} --epochs {args.epochs:g}"
                f" --budget {args.budget}")
    text = "\n".join([
        f"Command: `{cmd}` (CPU, 2 threads; load average {load:.1f} at the end, the machine shared with "
        "other jobs, so wall times are loaded times). n = 1 run per row (one seed): with "
        f"{args.n_eval} examples per split one example is {100 / args.n_eval:.2f} points, and the standard "
        f"error of an accuracy near 80% is about {100 * (0.8 * 0.2 / args.n_eval) ** 0.5:.1f} points.",
        "",
        *lines,
        "",
        f"Time per trial (median over the searches' trials): in-memory merge {merge_s:.2f} s, evaluation "
        f"({args.n_eval} examples, `trainer.evaluate`) {eval_s:.2f} s; inputs held in memory "
        f"{memory:.0f} MiB (start + 3 fine-tuned, float32). Fine-tuning the three models took "
        f"{ft_seconds:.0f} s.",
    ])
    print(text)
    print(json.dumps({"rows": rows, "timing": timing}, indent=1))
    if args.no_write:
        return
    from benchmarks.llm import write_section

    marker = "search-benchmark" + ("" if args.task == "topics" else f"-{args.task}")
    write_section(text, start=f"<!-- {marker}:start -->", end=f"<!-- {marker}:end -->")


def argv_default(args) -> bool:
    return (args.n_train, args.n_eval, args.epochs, args.budget) == (400, 300, 2.0, 27)


if __name__ == "__main__":
    main()
