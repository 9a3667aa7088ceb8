"""Issue 27's training-time rows (LoRA-MGPO, continual backprop, Wasserstein to init) beside plain fine-tuning
on the demo task, over several seeds: the mean and the spread of each row, and of its difference to plain.

    python benchmarks/papers_train.py --seeds 0 1 2              # train and save every row of each seed
    python benchmarks/papers_train.py --summarize --seeds 0 1 2  # the summary of the saved rows
    python benchmarks/papers_train.py --seeds 0 --rows MGPO &    # rows in parallel processes (no plain run)

Each seed is one ``benchmarks/robustness.py`` regularizers section restricted to these rows (its
``REGULARIZERS`` entries and settings, the same task and budget with that seed: data, start model and
training order all change with it); each row is printed and saved as ``<out>/seed<n>/<row>.json`` when it is
done; ``--summarize`` prints the summary from the saved files only. A process whose ``--rows`` leave out
plain fine-tuning does not train it (its train-time ratio is then against another process's plain run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import robustness  # noqa: E402

ROWS = ("plain fine-tuning", "MGPO", "continual backprop", "Wasserstein to init")


def summary(per_seed: list[dict[str, robustness.Row]]) -> str:
    """Mean (min-max) accuracy per row and split, and the mean (min-max) difference to plain, in points."""
    lines = ["| method | id_test acc % | shifted acc % | id_test vs plain | shifted vs plain | train time |",
             "|---|---|---|---|---|---|"]
    for name in ROWS:
        cells = [name]
        for split in robustness.SPLITS:
            xs = [100 * rows[name].scores[split] for rows in per_seed]
            cells.append(f"{statistics.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        for split in robustness.SPLITS:
            ds = [100 * (rows[name].scores[split] - rows[ROWS[0]].scores[split]) for rows in per_seed]
            cells.append(f"{statistics.mean(ds):+.1f} ({min(ds):+.1f} to {max(ds):+.1f})")
        ts = [rows[name].train_seconds / rows[ROWS[0]].train_seconds for rows in per_seed]
        cells.append(f"{statistics.mean(ts):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def save(name: str, row: robustness.Row, folder: Path) -> None:
    """One row of one seed as ``<folder>/<row>.json`` (scores and seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{slug(name)}.json").write_text(json.dumps(dataclasses.asdict(row), indent=1))


def load(folder: Path) -> dict[str, robustness.Row]:
    """Every row of one seed saved in ``folder``; a missing row is an error naming it."""
    missing = [name for name in ROWS if not (folder / f"{slug(name)}.json").exists()]
    if missing:
        raise SystemExit(f"papers_train: no saved row {missing} in {folder}")
    return {name: robustness.Row(**json.loads((folder / f"{slug(name)}.json").read_text())) for name in ROWS}


class RowsOnly(robustness.Context):
    """The shared context without its plain run: for a process that trains other rows only (the plain row
    and the train-time ratios then come from the process that ran it)."""

    def __init__(self, task: robustness.Task, out: Path):
        self.task, self.out, self.cache = task, out, {}


def from_log(log: Path) -> dict[str, robustness.Row]:
    """The rows a run printed (``<name>: Row(...)`` lines of ``robustness.run_rows`` or of this script)."""
    rows = {}
    for line in log.read_text().splitlines():
        for name in ROWS:
            if line.startswith(f"{name}: Row("):
                text = re.sub(r" \(\d+ s\)$", "", line[len(name) + 2:])  # run_rows adds its wall time
                rows[name] = eval(text, {"Row": robustness.Row, "nan": math.nan})  # noqa: S307 (our own repr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="the rows this process trains")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_papers_train"))
    p.add_argument("--summarize", action="store_true", help="print the summary of --seeds' saved rows only")
    p.add_argument("--from-log", type=Path, help="save the rows a run printed to LOG (one seed) and stop")
    args = p.parse_args(argv)
    if args.from_log is not None:
        for name, row in from_log(args.from_log).items():
            save(name, row, Path(args.out) / f"seed{args.seeds[0]}")
            print(f"seed {args.seeds[0]}: saved {name}")
        return 0
    if args.summarize:
        per_seed = [load(Path(args.out) / f"seed{s}") for s in args.seeds]
        print(f"{len(per_seed)} seeds {args.seeds}\n" + summary(per_seed))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for seed in args.seeds:
        folder = Path(args.out) / f"seed{seed}"
        task = robustness.demo_task(seed)
        ctx = robustness.Context(task, folder) if ROWS[0] in args.rows else RowsOnly(task, folder)
        for name in args.rows:
            row = robustness.REGULARIZERS[name](ctx)
            print(f"{name}: {row}", flush=True)
            save(name, row, folder)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
