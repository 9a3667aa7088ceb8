"""Per-rank memory and step overhead of robustft callbacks: 1 process vs DDP vs FSDP2 (CPU ranks, gloo).

    python benchmarks/distributed.py [--size small|medium] [--ranks 1 2 4] [--deepspeed]

For each mode (1 = a plain single process; 2 and 4 = FSDP2 through the TEST-ONLY CPU patch in
tests/distributed/harness.py; DDP at 2 ranks as the reference; with --deepspeed also DeepSpeed ZeRO-3 at 2
ranks) it trains a random-init Llama for 10 steps
(same global batch in every mode) three times, each in fresh processes: (a) no callback, (b) EMACallback,
(c) EMACallback + WiseFTCallback(alpha=0.5) + RandomPerturbationCallback(0.05). Each rank reports the
bytes of callback state it holds (EMA shadow + WiSE-FT start weights), its parameter bytes, its RSS (peak
and at the end, both above the RSS after imports) and the median wall and process CPU time of a step
(first 2 steps skipped, rank 0); the launched script asserts the mode that ran (DTensor parameters under
FSDP2). Printed: state per rank and its ratio to 1 rank, and the step times of (b) and (c) as ratios to
(a) of the same mode. The CPU time hardly moves with other load on the machine, the wall time does; with
more ranks than cores, wall step times are not meaningful (the ranks share the cores); memory is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.distributed.harness import torchrun  # noqa: E402

RUN = "benchmarks/distributed_run.py"
CASES = {"plain": "(a) none", "ema": "(b) EMA", "ema_wise_rwp": "(c) EMA+WiSE+RWP"}
MB = 2**20


def launch(mode: str, ranks: int, case: str, size: str, out: Path) -> list[dict]:
    """Run one case in one mode; the per-rank figures, rank 0 first."""
    if mode == "zero3":
        torchrun(RUN, mode, case, size, str(out), nproc=ranks, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    elif ranks == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, str(ROOT / RUN), mode, case, size, str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    else:
        torchrun(RUN, mode, case, size, str(out), nproc=ranks, timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def modes(ranks: list[int], deepspeed: bool = False) -> list[tuple[str, int]]:
    """(mode, ranks) to run: 1 rank plain, FSDP2 at every N > 1, DDP (and ZeRO-3) at 2."""
    out = []
    for n in sorted(set(ranks)):
        if n == 1:
            out.append(("single", 1))
        else:
            if n == 2:
                out.append(("ddp", 2))
            out.append(("fsdp", n))
            if n == 2 and deepspeed:
                out.append(("zero3", 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "medium"], default="small",
                        help="Llama size: small ~7.4M parameters, medium ~31M")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts to run")
    parser.add_argument("--deepspeed", action="store_true", help="also DeepSpeed ZeRO-3 at 2 ranks")
    args = parser.parse_args()
    if any(n < 1 for n in args.ranks):
        parser.error("--ranks: every count must be >= 1")
    t_start = time.perf_counter()
    results: dict[tuple[str, int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, n in modes(args.ranks, args.deepspeed):
            for case in CASES:
                t0 = time.perf_counter()
                figures = launch(mode, n, case, args.size, Path(tmp) / f"{mode}{n}_{case}")
                results[mode, n, case] = figures
                step = statistics.median(figures[0]["step_wall"])
                print(f"  ran {mode} x{n} {case}: {step * 1e3:.0f} ms/step (wall), launch took "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    any_run = next(iter(results.values()))[0]
    print(f"\nLlama '{args.size}': {any_run['full_param_bytes'] / 4 / 1e6:.2f}M float32 parameters "
          f"({any_run['full_param_bytes'] / MB:.1f} MB), 10 steps, global batch 8 x 64 tokens, "
          f"{os.cpu_count()} CPU cores, 1 thread per rank; memory: max over ranks, times: rank 0")
    one_rank = {case: r[0]["state_bytes"] for (mode, _, case), r in results.items() if mode == "single"}
    head = (f"{'mode':<7}{'ranks':>6}  {'callbacks':<18}{'state MB':>9}{'x 1 rank':>9}{'params MB':>10}"
            f"{'peak RSS':>9}{'peak-base':>10}{'end-base':>9}"
            f"{'wall ms':>8}{'x (a)':>6}{'cpu ms':>8}{'x (a)':>6}")
    print(head)
    print("-" * len(head))
    for (mode, n, case), ranks in results.items():
        state = max(r["state_bytes"] for r in ranks)
        ratio = f"{state / one_rank[case]:.3f}" if one_rank.get(case) else "-"
        wall, cpu = (statistics.median(ranks[0][key]) for key in ("step_wall", "step_cpu"))
        base_wall, base_cpu = (statistics.median(results[mode, n, "plain"][0][key])
                               for key in ("step_wall", "step_cpu"))
        name = {"single": "single", "ddp": "DDP", "fsdp": "FSDP2", "zero3": "ZeRO-3"}[mode]
        print(f"{name:<7}{n:>6}  {CASES[case]:<18}{state / MB:>9.2f}{ratio:>9}"
              f"{max(r['param_bytes'] for r in ranks) / MB:>10.2f}"
              f"{max(r['rss_peak_mb'] for r in ranks):>9.0f}"
              f"{max(r['rss_peak_mb'] - r['rss_base_mb'] for r in ranks):>10.0f}"
              f"{max(r['rss_end_mb'] - r['rss_base_mb'] for r in ranks):>9.0f}"
              f"{wall * 1e3:>8.0f}{wall / base_wall:>6.2f}{cpu * 1e3:>8.0f}{cpu / base_cpu:>6.2f}")
    if max(args.ranks) > (os.cpu_count() or 1):
        print(f"\nNote: {max(args.ranks)} ranks on {os.cpu_count()} cores oversubscribe the CPU: their step "
              "times are not meaningful, their memory is.")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
