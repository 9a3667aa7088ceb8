"""Launched by tests/test_distributed.py with torchrun (2 CPU ranks, gloo): EMA, WiSE-FT under DDP/FSDP2.

Writes, per rank, the EMA tensors (full, gathered from shards for FSDP2) and a brute-force EMA of
the recorded full weights; the weights WiSE-FT (α=0.3) left in the model and the dense formula on
the recorded start/end; plus what mode really ran, to OUT/rank<R>.safetensors and .json.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

sys.path.insert(0, os.getcwd())
from robustft import EMACallback, WiseFTCallback  # noqa: E402
from tests.tiny import lm_dataset, tiny_llama, training_args  # noqa: E402


def allow_fsdp_on_cpu() -> None:
    """TEST-ONLY patch: accelerate switches to FSDP only for GPU-like devices, and silently runs DDP on
    CPU (see shared/FACTS.md). Accept MULTI_CPU so the Trainer really shards with FSDP2 here."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched
    # the mesh accelerate builds for MULTI_CPU has no dimension names; let fully_shard build its own
    Accelerator.torch_device_mesh = property(lambda self: None)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


class Recorder(TrainerCallback):
    def __init__(self):
        self.points, self.dtensor, self.start = [], None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {n: full(p).clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.dtensor = all(hasattr(p, "placements") for p in params.values())
        self.points.append({n: full(p).clone() for n, p in params.items()})


def main(mode: str, out: str) -> None:
    extra = {}
    if mode == "fsdp":
        allow_fsdp_on_cpu()
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    decay = 0.7
    ema, rec = EMACallback(decay=decay, save_dir=None), Recorder()
    trainer = Trainer(
        model=tiny_llama(), args=training_args(out, max_steps=4, **extra),
        train_dataset=lm_dataset(), callbacks=[ema, rec],
    )
    trainer.train()
    rank = torch.distributed.get_rank()
    brute = dict(rec.points[0])
    for point in rec.points[1:]:
        brute = {n: decay * brute[n] + (1 - decay) * point[n] for n in point}
    averaged = {}
    for name, shard in zip(ema.average().names, ema.average().tensors):
        param = ema.params[name]
        if hasattr(param, "placements"):
            from torch.distributed.tensor import DTensor

            dt = DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape,
                                    stride=param.stride())
            averaged[name] = dt.full_tensor()
        else:
            averaged[name] = shard
    tensors = {f"ema.{n}": t.contiguous() for n, t in averaged.items()}
    tensors.update({f"brute.{n}": t.contiguous() for n, t in brute.items()})
    # WiSE-FT with a fixed α: the model ends at (1-α)·start + α·end, shard by shard
    alpha, wise_rec = 0.3, Recorder()
    wise = Trainer(
        model=tiny_llama(), args=training_args(os.path.join(out, "wise"), max_steps=3, **extra),
        train_dataset=lm_dataset(), callbacks=[WiseFTCallback(alpha=alpha, progress=False), wise_rec],
    )
    wise.train()
    for n, p in wise.model.named_parameters():
        if p.requires_grad:
            tensors[f"wise.{n}"] = full(p).contiguous()
            dense = (1 - alpha) * wise_rec.start[n] + alpha * wise_rec.points[-1][n]
            tensors[f"wise_ref.{n}"] = dense.contiguous()
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    local = sum(t.numel() for t in ema.average().tensors)
    info = {"world_size": torch.distributed.get_world_size(), "dtensor": rec.dtensor, "local_numel": local,
            "full_numel": sum(t.numel() for t in averaged.values()),
            "fsdp_enabled": trainer.is_fsdp_enabled, "wise_dtensor": wise_rec.dtensor,
            "distance": ema.distance()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a gloo group left open can abort at interpreter exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
