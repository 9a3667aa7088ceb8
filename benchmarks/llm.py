"""Robust LoRA fine-tuning of a real pretrained LLM (SmolLM2-135M-Instruct): scores and training throughput.

    python benchmarks/llm.py                     # --full demo setting + throughput; writes docs/benchmarks.md
    python benchmarks/llm.py --setting fast      # the `robustft demo --llm` default (a few minutes)
    python benchmarks/llm.py --skip-scores --rounds 3 --steps 6     # throughput only

1. Scores: ``robustft.demos.llm.run_llm_demo`` in the chosen setting: base model, plain LoRA, WiSE-FT at α*
   (chosen on in-distribution loss only, and under the retained budget), EMA, Flat-LoRA, LoRA-MGPO and
   Momentum-SAM, each scored by the mean answer-token loss on the in-distribution, shifted and
   retained-capability sets (lower is better), each row's difference from plain LoRA with its 95% paired
   bootstrap interval over the items (n in the table's footer).
2. Throughput and memory: training tokens per second of plain LoRA and of each callback (EMA, Momentum-SAM,
   RWP, LoRA-MGPO, Flat-LoRA, L2-SP, EWC) on the same model and data, ``--steps`` optimizer steps per run.
   Each micro-batch is ``--batch-size`` rows of exactly ``--seq-len`` tokens (the training conversations,
   chat template applied, concatenated and cut; the loss on every token), ``--grad-accum`` micro-batches
   per optimizer step; the default, 2 x 1024 x 1, is 2048 tokens per step. The one-pass perturbations
   choose their ε once per optimizer step but apply and undo it around each micro-batch (so the weights are
   clean whenever anything outside the forward/backward runs): their per-step work is diluted by longer
   micro-batches, not by more of them. Every run is a fresh process (``--threads`` torch threads) that
   reports its step times and its peak resident memory during ``train()`` (the high-water mark reset once
   the model is loaded: ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``). The variants
   are interleaved (the order rotates every round) and repeated ``--rounds`` times; each round's ratio is
   taken against that round's plain run, and the table gives the median and the range (min-max) over
   rounds, and the median extra peak memory over plain LoRA. EWC's Fisher is given (random positive
   values, drawn before training: its estimate is not part of the step). On a machine shared with other
   jobs, step times jump at random by several times: the load average before and after is printed.
   ``--model`` runs it on another causal LM folder (the tests use a tiny random Llama).

The section between the ``llm-benchmark`` markers in ``docs/benchmarks.md`` is replaced with the result
and the command (``--no-write`` to only print).
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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from robustft.demos import llm as demo_llm  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402

THROUGHPUT_VARIANTS = ("plain LoRA", "EMA", "Momentum-SAM", "RWP", "LoRA-MGPO", "Flat-LoRA", "L2-SP", "EWC")
#: the issue's targets (issue 26 item 3): step time over plain LoRA's
TARGETS = {"EMA": 1.02, "Momentum-SAM": 1.10, "RWP": 1.10, "LoRA-MGPO": 1.10, "Flat-LoRA": 1.10,
           "L2-SP": 1.05, "EWC": 1.05}
START, END = "<!-- llm-benchmark:start -->", "<!-- llm-benchmark:end -->"
THROUGHPUT_START, THROUGHPUT_END = "<!-- llm-throughput:start -->", "<!-- llm-throughput:end -->"
L2SP_STRENGTH = 0.01  # λ of the L2-SP and EWC rows (the cost does not depend on it)


@dataclass(frozen=True)
class Shape:
    """The work of one optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows of ``seq_len``."""

    seq_len: int = 1024
    batch_size: int = 2
    grad_accum: int = 1

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def variant_callbacks(name: str, cfg: demo_llm.LLMDemoConfig) -> list:
    """The callbacks of one throughput variant (EMA alone here, not sharing the plain run; EWC is added by
    :func:`train_once` once the adapter's parameter names are known)."""
    from robustft import EMACallback, L2SPCallback, RandomPerturbationCallback

    if name == "EMA":
        return [EMACallback(decay=cfg.ema_decay, warmup=True, eval_with_ema=False, save_dir=None)]
    if name == "RWP":  # filter-wise noise on the trained factors themselves (not Flat-LoRA's merged weight)
        return [RandomPerturbationCallback(rho=cfg.flat_lora_rho, lora=False, seed=cfg.seed)]
    if name == "L2-SP":
        return [L2SPCallback(L2SP_STRENGTH)]
    if name == "EWC":
        return []
    return demo_llm.method_callbacks(name, cfg)


def packed_rows(rows: list[dict], tokenizer, seq_len: int, n_rows: int) -> list[dict]:
    """``n_rows`` rows of exactly ``seq_len`` token ids: the conversations (chat template applied, or prompt
    and completion joined) concatenated, cycled as often as needed, and cut."""
    stream: list[int] = []
    for row in rows:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(row["prompt"][0]["content"] + " " + row["completion"][0]["content"])["input_ids"]
        stream.extend(ids)
    if not stream:
        raise ValueError("packed_rows: the training rows hold no tokens")
    need = seq_len * n_rows
    stream = (stream * (need // len(stream) + 1))[:need]
    return [{"input_ids": stream[i * seq_len:(i + 1) * seq_len]} for i in range(n_rows)]


def _reset_peak_memory(device: str) -> None:
    """Start a fresh high-water mark of this process's memory (RSS on CPU, allocated memory on CUDA)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then includes loading the model
        pass


def _peak_memory_mb(device: str) -> float:
    """This process's peak memory since :func:`_reset_peak_memory`, in MiB."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_once(name: str, cfg, model_dir: Path, train, tokenizer, out: Path, device: str = "cpu",
               bf16: bool = False, shape: Shape | None = None) -> tuple[float, list[float], float]:
    """One short LoRA run of variant ``name``: (tokens per optimizer step, step seconds after the first, peak
    memory of ``train()`` in MiB). ``shape`` None: the dataset's own rows (padded batches of
    ``cfg.batch_size``), else packed rows of ``shape``."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 **demo_llm.quantized_loading(cfg, device))  # --4bit: NF4
    clock = demo_llm.step_clock()
    overrides = {} if shape is None else {
        "per_device_train_batch_size": shape.batch_size, "gradient_accumulation_steps": shape.grad_accum,
        "max_length": shape.seq_len}
    trainer = SFTTrainer(
        model=model,
        args=demo_llm.sft_config(out, cfg, use_cpu=device == "cpu", bf16=bf16, logging_steps=10**6,
                                 **overrides),
        train_dataset=train, processing_class=tokenizer, peft_config=demo_llm.lora_config(cfg),
        callbacks=[clock, *variant_callbacks(name, cfg)],
    )
    if name == "EWC":  # the Fisher is given: drawn here, before training, not timed
        from robustft import EWCCallback

        gen = torch.Generator().manual_seed(cfg.seed)
        fisher = {n: torch.rand(p.shape, generator=gen).to(p.device)
                  for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.add_callback(EWCCallback(L2SP_STRENGTH, fisher=fisher))
    _reset_peak_memory(device)
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock.tokens / cfg.steps, clock.step_seconds[1:], _peak_memory_mb(device)


def run_one(spec: dict) -> dict:
    """One variant's run as :func:`throughput` starts it in a fresh process (``--one-run``): loads the data,
    trains, and returns tokens per step, the step seconds and the peak memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["cfg"].items()}
    cfg = demo_llm.LLMDemoConfig(**fields)
    shape = None if spec["shape"] is None else Shape(**spec["shape"])
    model_dir = Path(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = demo_llm.make_definition_task(demo_llm.wordnet_dir(), cfg.n_train, 0, cfg.seed)
    rows = task["train"]
    if shape is not None:
        rows = packed_rows(rows, tokenizer, shape.seq_len, cfg.steps * shape.batch_size * shape.grad_accum)
    tokens, steps, peak = train_once(spec["variant"], cfg, model_dir, Dataset.from_list(rows), tokenizer,
                                     Path(spec["out"]), spec["device"], spec["bf16"], shape)
    return {"tokens": tokens, "steps": steps, "peak_mb": peak}


def _run_in_process(spec: dict) -> dict:
    """:func:`run_one` in a fresh Python process (its own peak memory, no allocator state carried over)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-run", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmarks/llm.py: the {spec['variant']} run failed (exit {proc.returncode}):\n"
                           + proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def throughput(cfg, rounds: int, device: str = "cpu", bf16: bool = False, variants=THROUGHPUT_VARIANTS,
               shape: Shape | None = Shape(), threads: int | None = None, model_dir: Path | None = None,
               ) -> dict[str, dict[str, list[float]]]:
    """Interleaved, repeated short runs, one fresh process each: per variant, tokens/s, the ratio of its step
    time to plain LoRA's and its peak memory, per round."""
    if "plain LoRA" not in variants:
        raise ValueError("variants: plain LoRA is the reference of every ratio and must be run")
    model_dir = demo_llm.model_path() if model_dir is None else Path(model_dir)
    n_train = cfg.n_train if shape is None else max(cfg.n_train, 200)  # enough text for varied packed rows
    base = {"cfg": {**asdict(cfg), "n_train": n_train}, "shape": None if shape is None else asdict(shape),
            "model": str(model_dir), "device": device, "bf16": bf16, "threads": threads}
    per = {v: {"tokens_per_s": [], "ratio": [], "peak_mb": [], "extra_mb": []} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])
            speed, peak = {}, {}
            for v in order:
                got = _run_in_process({**base, "variant": v, "out": str(Path(tmp) / v)})
                tokens, steps = got["tokens"], got["steps"]
                speed[v], peak[v] = tokens / statistics.median(steps), got["peak_mb"]
                print(f"round {r + 1}/{rounds} {v:13s} {speed[v]:8.1f} tokens/s (median of {len(steps)} "
                      f"steps, {tokens:.0f} tokens/step), peak {peak[v]:.0f} MiB", flush=True)
            for v in variants:
                per[v]["tokens_per_s"].append(speed[v])
                per[v]["ratio"].append(speed["plain LoRA"] / speed[v])
                per[v]["peak_mb"].append(peak[v])
                per[v]["extra_mb"].append(peak[v] - peak["plain LoRA"])
    return per


def throughput_table(per: dict[str, dict[str, list[float]]]) -> str:
    """Median and range of tokens/s and of the ratio to plain LoRA, the target, and the extra peak memory."""
    rows = []
    for v, d in per.items():
        t, r = d["tokens_per_s"], d["ratio"]
        target = TARGETS.get(v)
        extra = d.get("extra_mb") or [float("nan")]
        rows.append([v, f"{statistics.median(t):.0f}", f"{min(t):.0f}-{max(t):.0f}",
                     f"{statistics.median(r):.3f}x", f"{min(r):.3f}-{max(r):.3f}x",
                     "-" if target is None else f"<= {target:.2f}x",
                     f"{statistics.median(extra):+.0f}" if v != "plain LoRA" else
                     f"{statistics.median(d.get('peak_mb') or [float('nan')]):.0f} (peak)"])
    return format_table(
        ["variant", "tokens/s (median)", "tokens/s (range)", "step time / plain (median)", "range", "target",
         "peak memory over plain, MiB (median)"], rows
    )


def write_section(text: str, path: Path = ROOT / "docs" / "benchmarks.md", start: str = START,
                  end: str = END) -> None:
    """Replace the text between the ``start`` and ``end`` markers (default: llm-benchmark's), or append it."""
    doc = path.read_text()
    block = f"{start}\n{text.strip()}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def publish(text: str, no_write: bool, start: str = START, end: str = END) -> int:
    """Print a benchmark's section and, unless ``no_write``, write it into docs/benchmarks.md; exit code 0."""
    print("\n" + text)
    if not no_write:
        write_section(text, start=start, end=end)
        print(f"\nwritten to {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


def throughput_text(per, args, shape: Shape | None, load0: float) -> list[str]:
    """The throughput paragraph (what was run, the load) and its table."""
    work = ("the dataset's own rows" if shape is None else
            f"{shape.grad_accum} micro-batch(es) of {shape.batch_size} x {shape.seq_len} tokens = "
            f"{shape.tokens} tokens per optimizer step")
    return [
        f"Training throughput, {args.rounds} interleaved rounds of {args.steps} steps per variant, each run "
        f"a fresh process with {args.threads or 'the default number of'} torch thread(s), "
        f"{'bf16 autocast' if args.bf16 else 'float32'} ({work}; median "
        "step after the first; the ratio is the step time over the same round's plain LoRA step; memory: the "
        "peak RSS of `train()` minus the same round's plain LoRA run's). Load average "
        f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores (on a shared machine "
        "single runs vary by several times: read the medians and the ranges).",
        "",
        throughput_table(per),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=["full", "fast"], default="full")
    p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per throughput run")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (throughput)")
    p.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch (throughput)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (throughput)")
    p.add_argument("--unpacked", action="store_true",
                   help="throughput on the setting's own rows and batch size (the pre-issue-26 measurement)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each throughput run")
    p.add_argument("--bf16", action="store_true",
                   help="throughput with bf16 autocast (the demo's training; default float32 as before)")
    p.add_argument("--variants", nargs="+", default=list(THROUGHPUT_VARIANTS), choices=THROUGHPUT_VARIANTS,
                   help="throughput variants (plain LoRA is always run)")
    p.add_argument("--model", default=None, help="a causal LM folder instead of SmolLM2-135M-Instruct")
    p.add_argument("--skip-scores", action="store_true", help="throughput only")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_llm_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--one-run", default=None, help=argparse.SUPPRESS)  # a throughput child: its JSON spec
    args = p.parse_args(argv)
    if args.one_run is not None:
        print("RESULT " + json.dumps(run_one(json.loads(args.one_run))), flush=True)
        return 0
    for name in ("rounds", "steps", "seq_len", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.steps < 2:
        p.error("--steps: at least 2 (the first step, which warms up, is not timed)")
    from dataclasses import replace

    cfg = demo_llm.FULL if args.setting == "full" else demo_llm.FAST
    command = "python benchmarks/llm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "## LLM: robust LoRA fine-tuning of SmolLM2-135M-Instruct" if args.model is None else
        f"## LLM: robust LoRA fine-tuning of {args.model}",
        "",
        f"Command: `{command.strip()}` (written by the script; setting `{args.setting}`: "
        f"{cfg.n_train} training examples, {cfg.steps} steps x {cfg.batch_size}, LoRA r={cfg.rank} on every "
        f"linear layer, lr {cfg.learning_rate:g}; eval {cfg.n_eval} words per set). Load average at start: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above ~1 per core, other jobs were running).",
    ]
    if not args.skip_scores:
        t0 = time.time()
        result = demo_llm.run_llm_demo(args.out, cfg, progress=False, model=args.model)
        parts += [
            "",
            "Mean answer-token loss (lower is better): `id` held-out WordNet definitions of animals and "
            "plants, `shifted` definitions of artifacts, `retained` the base model's own answers to "
            "general prompts (forgetting raises it). WiSE-FT (budget): the best `id` loss among the α whose "
            f"retained loss is at most {cfg.retained_budget:g} above the base model's. Time: wall seconds of "
            "that row's training run (EMA shares the plain LoRA run; WiSE-FT adds its α sweep).",
            "",
            result.table(),
            "",
            result.summary(),
            f"Total {time.time() - t0:.0f} s.",
        ]
    if not args.skip_throughput:
        shape = None if args.unpacked else Shape(args.seq_len, args.batch_size, args.grad_accum)
        variants = tuple(v for v in THROUGHPUT_VARIANTS if v == "plain LoRA" or v in args.variants)
        load0 = os.getloadavg()[0]
        per = throughput(replace(cfg, steps=args.steps), args.rounds, variants=variants, shape=shape,
                         threads=args.threads, model_dir=args.model, bf16=args.bf16)
        parts += ["", *throughput_text(per, args, shape, load0)]
    if args.skip_scores:  # the throughput alone has its own section; the scores' stays
        heading = "### Throughput and memory per callback (issue 26)\n\n"
        return publish(heading + "\n".join(parts[2:]), args.no_write, THROUGHPUT_START, THROUGHPUT_END)
    return publish("\n".join(parts), args.no_write)


if __name__ == "__main__":
    sys.exit(main())
