"""TALL-mask compression on the demo task: storage and accuracy of the recovered models (issue 27).

    python benchmarks/tall.py                       # 3 tasks, λ in 0.2 0.4 0.6; prints the markdown section
    python benchmarks/tall.py --tasks 2 --lambdas 0.4 --train-size 128 --eval-size 64     # a quick run

Tasks: three fine-tunings of the ``robustft demo`` zero-shot start (all-MiniLM-L6-v2), each on its own data
(seed t) whose spurious source tag is rotated by t (label c is tagged ``CUES[(c + t) % 4]``), so the three
task vectors share the topic features and differ in the shortcut they learn; task t is scored on its own
held-out in-distribution split (``id_test``, same rotation) and shifted split (the tag points to a wrong
label). Each model is saved as one safetensors file; ``robustft.merge.tall`` compresses the three against
the start (τ_MTL = Σ τ_t and one bit-packed mask per task) and each task's model is extracted back
(θ_0 + m_t ∘ τ_MTL) and scored. Reported: bytes on disk against the fine-tuned checkpoints, and accuracy
of the extracted models against the individual fine-tuned ones (and against τ_MTL unmasked, θ_0 + τ_MTL).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustft.demos import encoder as demo  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402


def rotated_split(tokenizer, n: int, seed: int, shift: int, shifted: bool = False):
    """The demo's data (``make_task``) with every source tag rotated by ``shift``, tokenized as the demo's."""
    from datasets import Dataset

    data = demo.make_task(n, seed, shifted)
    tags = {f"{c}:": f"{demo.CUES[(k + shift) % len(demo.CUES)]}:" for k, c in enumerate(demo.CUES)}
    texts = []
    for text in data["text"]:
        head, rest = text.split(" ", 1)
        texts.append(f"{tags[head]} {rest}")
    ds = Dataset.from_dict({"text": texts, "label": data["label"]})
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
    return ds.rename_column("label", "labels").remove_columns(["text"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--eval-size", type=int, default=300)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_tall_benchmark"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file, save_file
    from transformers import DataCollatorWithPadding, Trainer
    from transformers.utils import logging as hf_logging

    from robustft.merge.tall import tall_compress_checkpoints, tall_extract

    hf_logging.set_verbosity_error()
    command = "python benchmarks/tall.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    out = Path(args.out)
    start, tokenizer = demo.zero_shot_start(0)
    collator = DataCollatorWithPadding(tokenizer)
    def save(model, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))

    save(start, out / "base")

    def trainer_of(model, name, train=None, seed=0):
        targs = demo.training_arguments(out / name, seed, args.epochs, progress=False)
        return Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                       compute_metrics=demo.accuracy)

    def score(model, t, evals):
        trainer = trainer_of(model.eval(), f"eval{t}")
        return {s: trainer.evaluate(evals[s], metric_key_prefix=s)[f"{s}_accuracy"] for s in evals}

    def pct(acc: dict) -> list[str]:
        return [f"{100 * v:.1f}" for v in acc.values()]

    names, dirs, evals, rows = [], [], {}, []
    t0 = time.perf_counter()
    for t in range(args.tasks):
        name = f"task{t}"
        model, _ = demo.zero_shot_start(0)
        train = rotated_split(tokenizer, args.train_size, t, t)
        evals[name] = {"id_test": rotated_split(tokenizer, args.eval_size, t + 3, t),
                       "shifted": rotated_split(tokenizer, args.eval_size, t + 2, t, shifted=True)}
        trainer_of(model, name, train, seed=t).train()
        save(model, out / name)
        names.append(name)
        dirs.append(out / name)
        rows.append([name, "fine-tuned alone", "", *pct(score(model, t, evals[name]))])
        rows.append([name, "zero-shot start", "", *pct(score(start, t, evals[name]))])
    train_seconds = time.perf_counter() - t0
    individual = sum((d / "model.safetensors").stat().st_size for d in dirs)
    sizes = []
    base_sd = load_file(str(out / "base" / "model.safetensors"))
    mtl = None
    for lam in args.lambdas:
        folder = out / f"tall_{lam:g}"
        result = tall_compress_checkpoints(out / "base", dirs, folder, lam, names, overwrite=True)
        sizes.append((lam, result.nbytes, result.density))
        for t, name in enumerate(names):
            x = tall_extract(folder, name, out / f"x_{lam:g}_{name}", overwrite=True)
            model, _ = demo.zero_shot_start(0)
            model.load_state_dict(load_file(str(x / "model.safetensors")))
            acc = score(model, t, evals[name])
            rows.append([name, f"TALL λ={lam:g}", f"{100 * result.density[name]:.1f}", *pct(acc)])
        if mtl is None:  # θ_0 + τ_MTL (no mask): what the masks are for
            tuned = [load_file(str(d / "model.safetensors")) for d in dirs]
            mtl = {k: v + sum(sd[k] - v for sd in tuned) if v.is_floating_point() else v
                   for k, v in base_sd.items()}
    for t, name in enumerate(names):
        model, _ = demo.zero_shot_start(0)
        model.load_state_dict(mtl)
        rows.append([name, "θ_0 + τ_MTL (no mask)", "100.0", *pct(score(model, t, evals[name]))])
    rows.sort(key=lambda r: r[0])
    table = format_table(["task", "model", "mask density %", "id_test acc %", "shifted acc %"], rows)
    base_bytes = (out / "base" / "model.safetensors").stat().st_size
    size_lines = [f"- λ={lam:g}: {nbytes / 1e6:.1f} MB (τ_MTL + {args.tasks} bit masks) for "
                  f"{individual / 1e6:.1f} MB of {args.tasks} fine-tuned checkpoints: "
                  f"{nbytes / individual:.2f}x; with the shared base "
                  f"{(nbytes + base_bytes) / (individual + base_bytes):.2f}x of base + checkpoints"
                  for lam, nbytes, _ in sizes]
    text = "\n".join([
        "### Measured: TALL-mask compression on the demo task (issue 27)", "",
        f"Command: `{command.strip()}` ({args.tasks} tasks of {args.train_size} training examples, "
        f"{args.epochs:g} epochs each, {args.eval_size} examples per eval split; {load}; training took "
        f"{train_seconds:.0f} s).", "",
        "Storage (safetensors bytes on disk, float32):", "", *size_lines, "",
        "Accuracy of each task's model recovered from the compression (θ_0 + m_t ∘ τ_MTL) beside the model "
        "fine-tuned alone, the zero-shot start and the unmasked sum θ_0 + τ_MTL, on that task's own splits:",
        "",
        table,
    ])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
