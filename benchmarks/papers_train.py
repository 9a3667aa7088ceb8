"""Issue 27's training-time rows (LoRA-MGPO, continual backprop, Wasserstein to init) beside plain fine-tuning
on the demo task, over several seeds: the mean and the spread of each row, and of its difference to plain.

    python benchmarks/papers_train.py --seeds 0 1 2
    python benchmarks/papers_train.py --seeds 0 &    # seeds in parallel processes, then the summary
    python benchmarks/papers_train.py --seeds 1; wait; python benchmarks/papers_train.py --summarize 0 1

Each seed is one ``benchmarks/robustness.py`` regularizers section restricted to these rows (its
``REGULARIZERS`` entries and settings, the same task and budget with that seed: data, start model and
training order all change with it); the per-seed tables are printed and each seed's rows saved as
``<out>/seed<n>/rows.json``, then the summary (``--summarize``: from the saved files only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


def save(rows: dict[str, robustness.Row], path: Path) -> None:
    """One seed's rows as JSON (scores and seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: dataclasses.asdict(r) for name, r in rows.items()}, indent=1))


def load(path: Path) -> dict[str, robustness.Row]:
    return {name: robustness.Row(**r) for name, r in json.loads(path.read_text()).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_papers_train"))
    p.add_argument("--summarize", type=int, nargs="+", metavar="SEED",
                   help="print the summary of these seeds' saved rows; train nothing")
    args = p.parse_args(argv)
    if args.summarize:
        per_seed = [load(Path(args.out) / f"seed{s}" / "rows.json") for s in args.summarize]
        print(f"{len(per_seed)} seeds {args.summarize}\n" + summary(per_seed))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    per_seed = []
    for seed in args.seeds:
        ctx = robustness.Context(robustness.demo_task(seed), Path(args.out) / f"seed{seed}")
        rows = robustness.run_rows({name: robustness.REGULARIZERS[name] for name in ROWS}, ctx)
        print(f"seed {seed}:\n" + robustness.regularizer_table(rows, ctx), flush=True)
        save(rows, Path(args.out) / f"seed{seed}" / "rows.json")
        per_seed.append(rows)
    print(f"\n{len(args.seeds)} seeds {args.seeds}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores at the end\n" + summary(per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
