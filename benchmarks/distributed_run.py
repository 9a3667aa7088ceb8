"""Launched by benchmarks/distributed.py: one Trainer run of one case in one mode; each rank dumps figures.

argv: MODE CASE SIZE OUT. MODE is ``single`` (a plain process), ``ddp``, ``fsdp`` or ``zero3`` (under
``torch.distributed.run``; FSDP2 and DeepSpeed on CPU through the TEST-ONLY patches in
tests/distributed/harness.py, DeepSpeed with ``DS_ACCELERATOR=cpu``). CASE is
``plain`` (no callback), ``ema`` or ``ema_wise_rwp``. The global batch is the same in every mode. Each rank
writes OUT/rank<R>.json: the mode that ran (asserted), the bytes of callback state it holds, its parameter
bytes, its peak RSS, the RSS after imports and at the end, and its step times (wall and process CPU).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustft import EMACallback, RandomPerturbationCallback, WiseFTCallback  # noqa: E402
from robustft.core.params import is_zero3_param, local_tensor  # noqa: E402
from tests.distributed.harness import allow_deepspeed_on_cpu, allow_fsdp_on_cpu, finish, fsdp_args  # noqa: E402
from tests.tiny import training_args  # noqa: E402

GLOBAL_BATCH, SEQ_LEN, STEPS, SKIP = 8, 64, 10, 2
#: Llama shapes: (hidden, intermediate, layers, heads, vocab); untied embeddings
SIZES = {"small": (256, 688, 4, 4, 8192), "medium": (512, 1376, 6, 8, 12288)}
#: DeepSpeed's defaults, every parameter partitioned (small ones stay whole otherwise: docs/deepspeed.md)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto"}
CASES = {
    "plain": lambda: [],
    "ema": lambda: [EMACallback(decay=0.999, save_dir=None)],
    "ema_wise_rwp": lambda: [EMACallback(decay=0.999, save_dir=None),
                             WiseFTCallback(alpha=0.5, progress=False), RandomPerturbationCallback(0.05)],
}


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Resident set size of this process now, MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def llama(size: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=SEQ_LEN, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tokens(vocab: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, SEQ_LEN), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer:
    """Wall and process CPU time from the first ``on_step_begin`` to the last ``on_step_end`` of each step.

    The process CPU time (all threads of the rank, gloo's included) hardly moves with other load on the
    machine; the wall time does. Two callbacks: ``begin`` goes first in the Trainer's list and ``end``
    last, so the time covers every other callback's work in the step (robust callbacks move themselves
    after DefaultFlowCallback).
    """

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        timer = self

        class Begin(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.t0 = time.perf_counter(), time.process_time()

        class End(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.wall.append(time.perf_counter() - timer.t0[0])
                timer.cpu.append(time.process_time() - timer.t0[1])

        self.begin, self.end = Begin(), End()

    def install(self, trainer: Trainer) -> None:
        trainer.callback_handler.callbacks.insert(0, self.begin)
        trainer.callback_handler.callbacks.append(self.end)


def state_bytes(callbacks) -> int:
    """Bytes of callback state this rank actually holds: the EMA shadow and the WiSE-FT start weights."""
    tensors = []
    for cb in callbacks:
        if isinstance(cb, EMACallback):
            tensors += cb.average().tensors
        elif isinstance(cb, WiseFTCallback):
            tensors += cb.weights.start.tensors
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def check_mode(mode: str, trainer: Trainer, params: list[torch.Tensor], world: int) -> None:
    """Fail unless the run really was the mode asked for (accelerate falls back to DDP silently on CPU)."""
    dtensor = [hasattr(p, "placements") for p in params]
    ddp = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    if mode == "zero3":
        ok = world > 1 and trainer.is_deepspeed_enabled and all(is_zero3_param(p) for p in params)
    elif mode == "fsdp":
        ok = world > 1 and all(dtensor) and trainer.is_fsdp_enabled
    elif mode == "ddp":
        ok = world > 1 and not any(dtensor) and ddp and not trainer.is_fsdp_enabled
    else:
        ok = world == 1 and not any(dtensor) and not ddp
    if not ok:
        raise RuntimeError(f"{mode}: ran with world={world}, dtensor={any(dtensor)}, ddp={ddp}, "
                           f"fsdp_enabled={trainer.is_fsdp_enabled}")


def main(mode: str, case: str, size: str, out: str) -> None:
    base_rss = rss_mb()  # after imports
    if mode == "fsdp":
        allow_fsdp_on_cpu()
    if mode == "zero3":
        allow_deepspeed_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = llama(size)
    callbacks = CASES[case]()
    timer = StepTimer()
    extra = {"fsdp": fsdp_args(), "zero3": {"use_cpu": False, "deepspeed": ZERO3}}.get(mode, {})
    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(tmp, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                             logging_strategy="no", learning_rate=1e-4, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=tokens(model.config.vocab_size,
                                                                       GLOBAL_BATCH * STEPS),
                          callbacks=callbacks)
        timer.install(trainer)
        trainer.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    check_mode(mode, trainer, params, world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    info = {
        "mode": mode, "case": case, "size": size, "world_size": world, "rank": rank,
        "state_bytes": state_bytes(callbacks),
        "param_bytes": sum(local_tensor(p).numel() * p.element_size() for p in params),
        "full_param_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_base_mb": base_rss, "rss_peak_mb": rss_mb(), "rss_end_mb": rss_now_mb(),
        "step_wall": timer.wall[SKIP:], "step_cpu": timer.cpu[SKIP:],
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:5])
