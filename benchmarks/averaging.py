"""EMA update cost: fused vs per-parameter loop vs the memory-bandwidth floor, and EMACallback overhead.

    python benchmarks/averaging.py [--params 100e6] [--steps 30]

Prints, in one run: the time of one EMA update over a ~100M-parameter float32 set with the fused
``torch._foreach_lerp_`` path, a naive per-parameter loop (mul_ + add_), and a plain copy of the same
bytes (the floor), as ratios to the copy; then the per-step overhead of ``EMACallback(update_every=1)``
on a small GPT-2's Trainer step against the same Trainer without it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from robustft import EMACallback
from robustft.ops.averaging import ema_update_


def _best_times(fns: dict[str, object], repeat: int = 9) -> dict[str, float]:
    """Best-of-``repeat`` seconds per call for each function, measured in interleaved rounds.

    Interleaving spreads any load from other processes over all candidates; the minimum is the
    least disturbed run of each.
    """
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def update_costs(total: int) -> dict[str, float]:
    """Seconds per update for fused EMA, a per-parameter loop, and a plain copy of the same bytes."""
    sizes = [768 * 768] * 4 + [768 * 3072] * 2 + [768] * 8  # a transformer block's shapes
    per_block = sum(sizes)
    shapes = sizes * max(1, total // per_block)
    avg = [torch.randn(n) for n in shapes]
    live = [torch.randn(n) for n in shapes]
    decay = 0.999

    def naive():
        for a, l in zip(avg, live):
            a.mul_(decay).add_(l, alpha=1 - decay)

    costs = _best_times({
        "copy": lambda: torch._foreach_copy_(avg, live),
        "fused": lambda: ema_update_(avg, live, decay),
        "loop": naive,
    })
    return {"numel": float(sum(shapes)), **costs}


def trainer_step_overhead(steps: int) -> tuple[float, float, int]:
    """Seconds per optimizer step of a small GPT-2 Trainer without and with EMACallback(update_every=1)."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 8192, (steps * 8, 128)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def run(callbacks) -> float:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, use_cpu=True, report_to=[], disable_tqdm=True, max_steps=steps,
                                     per_device_train_batch_size=8, logging_steps=10_000, save_strategy="no")
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              callbacks=[c() for c in callbacks])
            result = trainer.train()
        return result.metrics["train_runtime"] / steps

    n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    # interleave to share the machine's drift between the two
    plain, ema = [], []
    for _ in range(2):
        plain.append(run([]))
        ema.append(run([lambda: EMACallback(decay=0.999, save_dir=None, eval_with_ema=False)]))
    return min(plain), min(ema), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="parameters in the EMA update set")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per Trainer run")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    c = update_costs(int(args.params))
    print(f"\nEMA update over {c['numel'] / 1e6:.1f}M float32 parameters (best of 9, interleaved)")
    print(f"{'path':<28}{'ms':>10}{'x copy':>10}")
    for key, label in [("copy", "plain copy (floor)"), ("fused", "fused _foreach_lerp_"),
                       ("loop", "per-parameter loop")]:
        print(f"{label:<28}{c[key] * 1e3:>10.1f}{c[key] / c['copy']:>10.2f}")
    plain, ema, n = trainer_step_overhead(args.steps)
    print(f"\nTrainer step, GPT-2 with {n / 1e6:.1f}M parameters, batch 8 x 128 tokens "
          f"({args.steps} steps, best of 2)")
    print(f"{'run':<28}{'ms/step':>10}{'ratio':>10}")
    print(f"{'plain':<28}{plain * 1e3:>10.1f}{1.0:>10.3f}")
    print(f"{'EMACallback(update_every=1)':<28}{ema * 1e3:>10.1f}{ema / plain:>10.3f}")
    print(f"\nEMA overhead: {100 * (ema / plain - 1):+.2f}% of the step")


if __name__ == "__main__":
    main()
