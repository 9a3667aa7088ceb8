"""Same TIES merge of three locally built checkpoints with robustft and with mergekit, in one run.

Each tool runs in its own fresh process that reports the wall time of the merge call and its peak
resident set (VmHWM); the printed ratios are robustft / mergekit (below 1 = robustft is better). The two
outputs are compared tensor by tensor (elements may differ only where several magnitudes tie at the trim
cut). The same run measures the I/O floor (every input tensor of the 4 checkpoints read, the output written
by the same writer, no maths) and robustft's other merge methods (``--methods``) on the same inputs.
``--commands N`` times the whole commands (``robustft merge`` and ``mergekit-yaml --lazy-unpickle``, each a
fresh process with default threads, start-up and side files included), N interleaved rounds.
``--grammar N`` times the TIES recipe with scalars against the same recipe written with mergekit's gradient
and filter lists (per-model density and weight spread over the layers), N interleaved pairs: the cost of
resolving parameters per tensor.

    python benchmarks/merge.py                 # --size small: ~17M-parameter Llama x 4, < 3 min here
    python benchmarks/merge.py --size full     # the issue's size: ~134M-parameter Llama x 4
    python benchmarks/merge.py --methods none --grammar 5   # scalars vs gradients + filters, 5 pairs
    python benchmarks/merge.py --size full --methods none --commands 3   # whole commands, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
tool, recipe_path, out, workers = sys.argv[1:5]
import yaml
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")
if tool == "robustft":
    from robustft.merge import merge_checkpoints, load_recipe
    recipe = load_recipe(recipe_path)
    start_rss = reset_peak()
    t = time.perf_counter()
    merge_checkpoints(recipe, out, progress=False, workers=int(workers))
elif tool == "floor":  # read every input tensor, write the base's with the same writer: no maths
    from pathlib import Path
    from robustft.merge import load_recipe
    from robustft.merge.io import CheckpointReader, ShardedWriter
    recipe = load_recipe(recipe_path)
    start_rss = reset_peak()
    t = time.perf_counter()
    readers = [CheckpointReader(p) for p in [recipe.base_model, *(m.path for m in recipe.models)]]
    plan = [(name, info.shape, info.dtype) for name, info in readers[0].infos.items()]
    Path(out).mkdir()
    with ShardedWriter(out, plan, "5GB", {"merged_by": "robustft"}) as writer:
        for name, _, _ in plan:
            tensors = [r.get(name) for r in readers]
            writer.write(name, tensors[0])
            del tensors
else:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(recipe_path)))
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    start_rss = reset_peak()
    t = time.perf_counter()
    run_merge(cfg, out, opts)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak": status("VmHWM"), "start": start_rss}))
"""

#: robustft's other methods timed on the same inputs: method -> (parameters, number of fine-tuned models)
METHODS = {
    "task_arithmetic": ({}, 3),
    "dare_ties": ({"density": 0.2}, 3),
    "della": ({"density": 0.4}, 3),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.01}, 3),
    "tsv_m": ({}, 3),
    "iso_c": ({}, 3),
    "karcher": ({}, 3),
    "nuslerp": ({}, 2),
    "model_stock": ({}, 3),
}


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


def run_tool(tool: str, recipe: Path, out: Path, threads: int, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(recipe), str(out), str(workers)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
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
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--workers", type=int, default=2, help="robustft's tensors merged at once")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="robustft methods also timed (comma list, or none)"
    )
    parser.add_argument("--workdir", default=None, help="reuses the checkpoints already built there")
    parser.add_argument(
        "--grammar", type=int, default=0, metavar="N",
        help="also time TIES with gradient and filter lists against scalars, N interleaved pairs",
    )  # fmt: skip
    parser.add_argument(
        "--commands", type=int, default=0, metavar="N",
        help="also time the whole commands (robustft merge, mergekit-yaml), N interleaved rounds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import mergekit  # noqa: F401
    except ImportError:
        sys.exit("mergekit is not installed: pip install mergekit==0.1.5")
    methods = [] if args.methods == "none" else args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="robustft-bench-merge-"))
    import yaml

    if (work / "built.json").is_file():
        built = json.loads((work / "built.json").read_text())
        if args.size not in built:
            sys.exit(f"--workdir {work} holds the checkpoints of --size {', '.join(built)}")
        n_params = built[args.size]
        base, dirs = work / "base", [work / f"ft{i}" for i in range(3)]
    else:
        base, dirs, n_params = build(work, args.size)
        (work / "built.json").write_text(json.dumps({args.size: n_params}))
    for old in work.glob("out_*"):
        shutil.rmtree(old)

    def recipe(method: str, params: dict, models: list[dict]) -> Path:
        data = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}
        if params:
            data["parameters"] = params
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    ties = recipe(
        "ties", {}, [{"model": str(d), "parameters": {"weight": 1.0, "density": args.density}} for d in dirs]
    )
    results = {}
    for tool in ("floor", "robustft", "mergekit"):
        results[tool] = run_tool(tool, ties, work / f"out_{tool}", args.threads, args.workers)
    differ, total, worst = compare(work / "out_robustft", work / "out_mergekit")
    grammar = _grammar_pairs(recipe, work, dirs, args) if args.grammar > 0 else None
    commands = _command_rounds(ties, work, args.commands) if args.commands > 0 else None
    others = {}
    for method in methods:
        params, n = METHODS[method]
        path = recipe(method, params, [{"model": str(d)} for d in dirs[:n]])
        others[method] = run_tool("robustft", path, work / f"out_{method}", args.threads, args.workers)
        shutil.rmtree(work / f"out_{method}")
    fl, rf, mk = results["floor"], results["robustft"], results["mergekit"]
    mb = 2**20
    print(f"TIES merge of 3 fine-tuned + base, {n_params / 1e6:.1f}M params each (--size {args.size}), "
          f"float32, density {args.density}, OMP_NUM_THREADS={args.threads}, "
          f"robustft workers={args.workers}")  # fmt: skip
    print(f"{'run':<26}{'wall s':>10}{'peak RSS MB':>14}{'RSS growth MB':>16}{'x floor':>10}")
    rows = {"I/O floor (read 4, write)": fl, "robustft ties": rf, "mergekit ties": mk}
    rows.update({f"robustft {m}": r for m, r in others.items()})
    for label, r in rows.items():
        print(f"{label:<26}{r['seconds']:>10.2f}{r['peak'] / mb:>14.0f}{(r['peak'] - r['start']) / mb:>16.0f}"
              f"{r['seconds'] / fl['seconds']:>10.2f}")  # fmt: skip
    growth = (rf["peak"] - rf["start"]) / max(1, mk["peak"] - mk["start"])
    print(f"ratio robustft/mergekit: wall {rf['seconds'] / mk['seconds']:.2f}x, "
          f"peak RSS {rf['peak'] / mk['peak']:.2f}x, RSS growth {growth:.2f}x; "
          f"robustft = {rf['seconds'] / fl['seconds']:.2f}x the I/O floor")  # fmt: skip
    print(f"outputs: {differ} of {total} elements differ ({differ / total:.2e}), max abs diff {worst:.3g}")
    if commands is not None:
        ours, theirs = commands
        ratios = sorted(o / t for o, t in zip(ours, theirs, strict=True))
        print(f"whole commands, default threads, {len(ratios)} interleaved rounds: robustft merge "
              f"{_spread(ours)} s, mergekit-yaml {_spread(theirs)} s; ratio median "
              f"{ratios[len(ratios) // 2]:.3f}x (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")  # fmt: skip
    if grammar is not None:
        scalar, dynamic = grammar
        ratios = sorted(d / s for s, d in zip(scalar, dynamic, strict=True))
        print(f"TIES with gradients + filters vs scalars, {len(ratios)} interleaved pairs: scalars "
              f"{_spread(scalar)} s, gradients {_spread(dynamic)} s; "
              f"ratio median {ratios[len(ratios) // 2]:.3f}x "
              f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")  # fmt: skip
        for label in ("ties_scalar", "ties"):
            ms, n = _resolution_ms(work / f"{label}.yaml")
            print(f"  parameters resolved for {n} tensors ({label}.yaml): {ms:.2f} ms per merge")


def _command_rounds(recipe: Path, work: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Wall times of the whole ``robustft merge`` and ``mergekit-yaml`` commands (fresh processes, default
    threads), interleaved rounds; each output is removed before the next run."""
    import time

    commands = (
        [sys.executable, "-m", "robustft", "merge", str(recipe), str(work / "out_cmd"), "--no-progress"],
        [str(Path(sys.executable).with_name("mergekit-yaml")), str(recipe), str(work / "out_cmd"),
         "--lazy-unpickle"],
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for k, command in enumerate(commands):
            start = time.perf_counter()
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[k].append(time.perf_counter() - start)
            shutil.rmtree(work / "out_cmd")
    return times


def _resolution_ms(path: Path, repeats: int = 20) -> tuple[float, int]:
    """In-process time of resolving and checking every tensor's parameters (the engine's per-tensor work
    for gradients and filters), independent of the machine's load on the merge itself."""
    import time

    from robustft.merge import load_recipe
    from robustft.merge.engine import layer_position
    from robustft.merge.io import CheckpointReader
    from robustft.merge.recipe import check_resolved

    recipe = load_recipe(path)
    names = CheckpointReader(recipe.base_model).names
    count = max(int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n) + 1
    labels = [m.path for m in recipe.models]
    start = time.perf_counter()
    for _ in range(repeats):
        for name in names:
            layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
            t = 0.0 if layer is None else layer_position(layer, count)
            method, g, m = recipe.resolve(name=name, t=t)
            check_resolved(name, method, g, m, True, labels)
    return (time.perf_counter() - start) / repeats * 1e3, len(names)


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.2f} [{ordered[0]:.2f}-{ordered[-1]:.2f}]"


#: the same TIES recipe in mergekit's grammar: per-model density and weight as gradient and filter lists
GRADIENT_DENSITY = [
    {"filter": "self_attn", "value": [0.1, 0.3]},
    {"filter": "mlp", "value": [0.3, 0.1]},
    {"value": 0.2},
]


def _grammar_pairs(recipe, work: Path, dirs: list[Path], args) -> tuple[list[float], list[float]]:
    """Wall times of robustft's TIES with scalars and with gradients + filters, interleaved pairs."""
    own = {"weight": 1.0, "density": args.density}
    scalar = recipe("ties", {}, [{"model": str(d), "parameters": own} for d in dirs])
    scalar = scalar.rename(work / "ties_scalar.yaml")
    own = {"weight": [1.0, 0.8, 1.0], "density": GRADIENT_DENSITY}
    dynamic = recipe("ties", {}, [{"model": str(d), "parameters": own} for d in dirs])
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(args.grammar):
        for k, path in enumerate((scalar, dynamic)):
            out = work / f"out_grammar{k}"
            times[k].append(run_tool("robustft", path, out, args.threads, args.workers)["seconds"])
            shutil.rmtree(out)
    return times


if __name__ == "__main__":
    main()
