"""What starting robustft costs: ``import robustft.ops`` and ``robustft --version`` next to ``import torch``.

Each command runs in a fresh interpreter, the commands interleaved round by round (the order rotates),
so load from other processes hits them alike; the table gives the median and the spread (min-max)
of the wall times, and the ratios of the medians. Goals (issue 12): ``robustft --version`` under 1 s,
``import robustft.ops`` under 1.3x ``import torch``.

    python benchmarks/imports.py                       # 7 rounds, this checkout
    python benchmarks/imports.py --compare /work/main  # also time another checkout (before/after)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import robustft": ["-c", "import robustft"],
    "import robustft.ops": ["-c", "import robustft.ops"],
    "robustft --version": ["-m", "robustft", "--version"],
    "robustft merge --help": ["-m", "robustft", "merge", "--help"],
}


def timed(args: list[str], tree: Path) -> float:
    """Wall seconds of ``python ARGS`` run from ``tree`` with that checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=tree, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time as well")
    args = parser.parse_args()

    cases = {name: (cmd, ROOT) for name, cmd in COMMANDS.items()}
    if args.compare is not None:
        for name in ("import robustft.ops", "robustft --version"):
            cases[f"{name} ({args.compare})"] = (COMMANDS[name], args.compare.resolve())
    names = list(cases)
    for name in names:  # warm the page cache and the .pyc files once, untimed
        timed(*cases[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(*cases[name]))
    load = (load, os.getloadavg()[0])

    print(f"{args.rounds} interleaved rounds; load average {load[0]:.1f} at start, {load[1]:.1f} at end; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"{'command':<48} {'median s':>9} {'min-max s':>13}")
    median = {}
    for name in names:
        median[name] = statistics.median(times[name])
        print(f"{name:<48} {median[name]:>9.2f} {min(times[name]):>6.2f}-{max(times[name]):<6.2f}")
    ratio = median["import robustft.ops"] / median["import torch"]
    print(f"import robustft.ops / import torch: {ratio:.2f}x (goal < 1.3x)")
    print(f"robustft --version: {median['robustft --version']:.2f} s (goal < 1 s), "
          f"{median['robustft --version'] / median['import torch']:.2f}x import torch")


if __name__ == "__main__":
    main()
