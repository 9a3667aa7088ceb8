"""Same TIES merge of three locally built checkpoints with robustft and with mergekit, in one run.

Each tool runs in its own fresh process that reports the wall time of the merge call and its peak
resident set (VmHWM); the printed ratios are robustft / mergekit (below 1 = robustft is better). The two
outputs are compared tensor by tensor (elements may differ only where the elected sign is a tie).

    python benchmarks/merge.py                 # --size small: ~17M-parameter Llama x 4, < 3 min here
    python benchmarks/merge.py --size full     # the issue's size: ~134M-parameter Llama x 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's robustft, also in the child processes (PYTHONPATH)

SIZES = {
    # name: (hidden, intermediate, layers, vocab)
    "tiny": (128, 256, 2, 1000),
    "small": (384, 1024, 6, 8000),
    "full": (768, 2048, 12, 32000),
}

CHILD = r"""
import json, sys, time
tool, recipe_path, out = sys.argv[1:4]
import yaml
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
if tool == "robustft":
    from robustft.merge import merge_checkpoints, load_recipe
    recipe = load_recipe(recipe_path)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_rss = status("VmRSS")
    t = time.perf_counter()
    merge_checkpoints(recipe, out, progress=False)
else:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(recipe_path)))
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_rss = status("VmRSS")
    t = time.perf_counter()
    run_merge(cfg, out, opts)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak": status("VmHWM"), "start": start_rss}))
"""


def build(root: Path, size: str, n: int = 3) -> tuple[Path, list[Path], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    shard = "200MB"
    model.save_pretrained(root / "base", max_shard_size=shard)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + 0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ft{i}", max_shard_size=shard)
        dirs.append(root / f"ft{i}")
    return root / "base", dirs, n_params


def run_tool(tool: str, recipe: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(recipe), str(out)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    from robustft.merge.io import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    differ = total = 0
    worst = 0.0
    for name in ra.names:
        x, y = ra.get(name).float(), rb.get(name).float()
        close = torch.isclose(x, y, rtol=1e-5, atol=1e-6)
        differ += int((~close).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return differ, total, worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both tools")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    try:
        import mergekit  # noqa: F401
    except ImportError:
        sys.exit("mergekit is not installed: pip install mergekit==0.1.5")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="robustft-bench-merge-"))
    base, dirs, n_params = build(work, args.size)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": args.density}} for d in dirs],
        "dtype": "float32",
    }
    import yaml

    path = work / "ties.yaml"
    path.write_text(yaml.safe_dump(recipe))
    results = {}
    for tool in ("robustft", "mergekit"):
        results[tool] = run_tool(tool, path, work / f"out_{tool}", args.threads)
    differ, total, worst = compare(work / "out_robustft", work / "out_mergekit")
    rf, mk = results["robustft"], results["mergekit"]
    mb = 2**20
    print(f"TIES merge of 3 fine-tuned + base, {n_params / 1e6:.1f}M params each (--size {args.size}), "
          f"float32, density {args.density}, OMP_NUM_THREADS={args.threads}")  # fmt: skip
    print(f"{'tool':<10}{'wall s':>10}{'peak RSS MB':>14}{'RSS growth MB':>16}")
    for tool, r in results.items():
        print(f"{tool:<10}{r['seconds']:>10.2f}{r['peak'] / mb:>14.0f}{(r['peak'] - r['start']) / mb:>16.0f}")
    growth = (rf["peak"] - rf["start"]) / max(1, mk["peak"] - mk["start"])
    print(f"ratio robustft/mergekit: wall {rf['seconds'] / mk['seconds']:.2f}x, "
          f"peak RSS {rf['peak'] / mk['peak']:.2f}x, RSS growth {growth:.2f}x")  # fmt: skip
    print(f"outputs: {differ} of {total} elements differ ({differ / total:.2e}), max abs diff {worst:.3g}")


if __name__ == "__main__":
    main()
