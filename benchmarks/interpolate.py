"""Streamed checkpoint interpolation vs a plain load-lerp-save script: time and peak RSS.

Two random float32 checkpoints of ``--size`` MB each (sharded like HF, 4 MB tensors) are written
to a temp dir; each method then runs in its own subprocess, which reports its wall time and
``ru_maxrss`` (peak resident memory) minus the RSS right after imports. Both outputs are compared.

    python benchmarks/interpolate.py            # 2 x 100 MB
    python benchmarks/interpolate.py --size 500 # 2 x 500 MB (the issue's size)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's robustft, not an installed one

CHILD = r"""
import json, resource, sys, time
import torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, {root!r})
from robustft.merge.interpolate import interpolate_checkpoints
method, a, b, out = sys.argv[1:5]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if method == "robustft":
    interpolate_checkpoints(a, b, out, 0.5)
else:  # plain torch script: load both models, lerp, save one file
    index = json.load(open(a + "/model.safetensors.index.json"))["weight_map"]
    sa, sb = {{}}, {{}}
    for f in sorted(set(index.values())):
        sa.update(load_file(a + "/" + f)); sb.update(load_file(b + "/" + f))
    import os; os.makedirs(out)
    save_file({{k: torch.lerp(sa[k], sb[k], 0.5) for k in sa}}, out + "/model.safetensors")
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": dt, "peak_mb": peak / 1024, "extra_mb": (peak - base) / 1024}}))
"""


def make_checkpoint(path: Path, size_mb: int, seed: int) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    n_tensors = max(2, size_mb // 4)
    path.mkdir(parents=True)
    weight_map, shard, shard_bytes, shard_i = {}, {}, 0, 0
    for i in range(n_tensors):
        shard[f"layers.{i}.weight"] = torch.randn(1024, 1024, generator=g)
        shard_bytes += 4 << 20
        if shard_bytes >= 50 << 20 or i == n_tensors - 1:
            name = f"model-{shard_i:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, shard_i = {}, 0, shard_i + 1
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return n_tensors


def run(method: str, a: Path, b: Path, out: Path) -> dict:
    code = CHILD.format(root=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code, method, str(a), str(b), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="MB per checkpoint (default 100; issue: 500)")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        n = make_checkpoint(d / "a", args.size, 0)
        make_checkpoint(d / "b", args.size, 1)
        res = {m: run(m, d / "a", d / "b", d / f"out_{m}") for m in ("plain", "robustft")}
        # same numbers out of both
        from robustft.merge.io import CheckpointReader

        r = CheckpointReader(d / "out_robustft")
        plain = load_file(str(d / "out_plain" / "model.safetensors"))
        assert all(torch.equal(r.get(k), plain[k]) for k in plain), "outputs differ"
    print(f"two checkpoints of {args.size} MB ({n} tensors of 4 MB each), float32, alpha=0.5")
    for m, v in res.items():
        print(
            f"  {m:9s} {v['seconds']:6.2f} s   peak RSS {v['peak_mb']:7.0f} MB   "
            f"above baseline {v['extra_mb']:7.0f} MB"
        )
    p, s = res["plain"], res["robustft"]
    print(
        f"  time ratio robustft/plain {s['seconds'] / p['seconds']:.2f}x; "
        f"extra memory ratio {s['extra_mb'] / max(p['extra_mb'], 1):.3f}x"
    )


if __name__ == "__main__":
    main()
