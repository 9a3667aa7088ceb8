"""Launched by tests/distributed/test_matrix.py: every callback trained in one mode, results dumped for
comparison.

argv: MODE OUT [CASE ...]; ``<case>_refused``: that case must refuse MODE (``refused_case``);
``table-<Callback>``: that callback's row of tests/callbacks/settings.py
on its model, dropout off, on the tiny token data. MODE is ``single`` (1 rank), ``ddp`` or ``fsdp``
(2 CPU ranks, gloo; FSDP2 through the test-only patch in harness.py). The global batch is the whole
8-sample dataset in every mode (8 per device on 1 rank, 4 per device on 2; halved again with 2 accumulated
micro-batches for ``<case>_ga2``), so every mode takes the same steps. Per case, each rank writes
OUT/<case>/rank<R>.safetensors (final trainable weights and the callback's state, gathered to full tensors)
and OUT/<case>/rank<R>.json (the mode that ran, the size of the state this rank holds, logged metrics).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import Trainer

sys.path.insert(0, os.getcwd())
from robustft import (  # noqa: E402
    EMACallback,
    LAWACallback,
    LoRAArithmeticCallback,
    MGPOCallback,
    MomentumInterpolationCallback,
    MomentumSAMCallback,
    RandomPerturbationCallback,
    SAMCallback,
    SWACallback,
    WiseFTCallback,
)
from robustft.core.params import local_tensor, select_parameters  # noqa: E402
from tests.callbacks.settings import MODELS, SETTINGS  # noqa: E402
from tests.distributed.harness import allow_fsdp_on_cpu, finish, fsdp_args, full, full_like  # noqa: E402
from tests.tiny import lm_dataset, tiny_llama, token_dataset, training_args  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3


def lora_llama():
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def averaging(cb):
    return lambda: (tiny_llama(), [cb()])


CASES = {
    "ema": averaging(lambda: EMACallback(decay=0.7)),
    "swa": averaging(lambda: SWACallback(start=1)),
    "lawa": averaging(lambda: LAWACallback(k=2, update_every=1)),
    "momentum": averaging(lambda: MomentumInterpolationCallback(momentum=0.6)),
    "wise_fixed": lambda: (tiny_llama(), [WiseFTCallback(alpha=0.3, progress=False)]),
    "wise_slerp": lambda: (tiny_llama(), [WiseFTCallback(alpha=0.4, method="slerp", progress=False)]),
    "wise_lora": lambda: (lora_llama(), [WiseFTCallback(alpha=0.5, progress=False)]),
    "wise_sweep": lambda: (tiny_llama(), [WiseFTCallback(
        alphas=[0.0, 0.5, 1.0], eval_datasets={"id": lm_dataset(8, seed=1), "shifted": lm_dataset(8, seed=2)},
        id_dataset="id", metric="eval_loss", greater_is_better=False, progress=False)]),
    "sam": lambda: (tiny_llama(), [SAMCallback(rho=0.05)]),
    "asam": lambda: (tiny_llama(), [SAMCallback(rho=0.5, adaptive=True)]),
    "msam": lambda: (tiny_llama(), [MomentumSAMCallback(rho=0.3)]),
    "rwp": lambda: (tiny_llama(), [RandomPerturbationCallback(rho=0.05)]),
    "flat_lora": lambda: (lora_llama(), [RandomPerturbationCallback(rho=0.05)]),
    "mgpo": lambda: (lora_llama(), [MGPOCallback(rho=0.05)]),  # refused under FSDP2: see refused_case
}


class BNNet(torch.nn.Module):
    """A tiny MLP with BatchNorm: SWA recomputes its statistics on each rank's shard of the data."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                        torch.nn.Linear(8, 2))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def features(n: int = GLOBAL_BATCH) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g) * 3 + 1
    return Dataset.from_dict({"x": x.tolist(), "labels": (x[:, 0] > 1).long().tolist()})


def lora_arithmetic(out: Path):
    return lambda: (lora_llama(), [LoRAArithmeticCallback({"self": 1.0, str(out / "other"): -0.5})])


def callback_state(cb) -> dict[str, torch.Tensor]:
    """The callback's state as full tensors (gathered from shards), and the numel this rank holds."""
    if hasattr(cb, "average"):
        avg = cb.average()
        params = cb.params
    elif isinstance(cb, WiseFTCallback):
        avg, params = cb.weights.start, cb.weights.params
    else:
        return {}
    return {f"state.{n}": full_like(params[n], t).contiguous() for n, t in zip(avg.names, avg.tensors)}


def local_state_numel(cb) -> int:
    if hasattr(cb, "average"):
        return cb.average().numel()
    if isinstance(cb, WiseFTCallback):
        return cb.weights.stored_numel()
    return 0


def table_case(setting):
    """A settings-table row as a case: its model with dropout off (the ranks draw other dropout masks than
    one process) and its callback."""

    def factory():
        model = MODELS[setting.model]()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model, [setting.make(model)]

    return factory


def run_case(name: str, factory, mode: str, out: Path, resume: bool = False, accumulation: int = 1) -> None:
    model, callbacks = factory()
    extra = fsdp_args() if mode == "fsdp" else {}
    if isinstance(model, BNNet):
        data = features()
    elif name.startswith("table-"):
        data = token_dataset(GLOBAL_BATCH)
        # the table's BERT loss ignores num_items_in_batch: the Trainer's token averaging across devices
        # would then scale its DDP gradient by the world size (a transformers quirk, not a callback's)
        extra["average_tokens_across_devices"] = False
        # plain SGD: AdamW would blow the rounding noise of gradients that are zero in exact maths (attention
        # key biases, unused embedding rows under a penalty) up to learning-rate-sized steps in either mode
        extra["optim"] = "sgd"
    else:
        data = lm_dataset(GLOBAL_BATCH)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = GLOBAL_BATCH // world // accumulation
    case_dir = out / name
    save = dict(save_strategy="steps", save_steps=2) if resume else {}
    args = training_args(case_dir, max_steps=STEPS, per_device_train_batch_size=per_device,
                         per_device_eval_batch_size=per_device, gradient_accumulation_steps=accumulation,
                         **save, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if resume:  # stop after the checkpoint at step 2, then resume into a fresh model and Trainer
        trainer.train()
        model, callbacks = factory()
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=str(case_dir / "checkpoint-2"))
    else:
        trainer.train()
    cb = callbacks[0]
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    tensors = {f"final.{n}": full(p).contiguous() for n, p in trainable.items()}
    tensors.update(callback_state(cb))
    tensors.update({f"buffer.{n}": b.detach().float() for n, b in trainer.model.named_buffers()
                    if n.endswith(("running_mean", "running_var"))})
    metrics = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if "/" in key or key.startswith("wise_ft_") and isinstance(value, (int, float)):
                metrics[key] = value
    info = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "dtensor": all(hasattr(p, "placements") for p in trainable.values()),
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "local_param_numel": sum(local_tensor(p).numel() for p in trainable.values()),
        "full_param_numel": sum(p.numel() for p in trainable.values()),
        "local_state_numel": local_state_numel(cb),
        "metrics": metrics,
        "curve": cb.curve.as_dict() if getattr(cb, "curve", None) is not None else None,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_file(tensors, str(case_dir / f"rank{rank}.safetensors"))
    (case_dir / f"rank{rank}.json").write_text(json.dumps(info))


def refused_case(name: str, factory, mode: str, out: Path) -> None:
    """A case that must refuse this mode by name at train begin, before any step: the message (None when it
    trained) and the step reached go to OUT/<name>_refused/rank<R>.json."""
    model, callbacks = factory()
    case_dir = out / f"{name}_refused"
    extra = fsdp_args() if mode == "fsdp" else {}
    args = training_args(case_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // 2, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(GLOBAL_BATCH), callbacks=callbacks)
    try:
        trainer.train()
    except ValueError as err:
        message = str(err)
    else:
        message = None
    case_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (case_dir / f"rank{rank}.json").write_text(json.dumps({"refused": message,
                                                           "global_step": trainer.state.global_step}))


def hsdp_refusal(out: Path) -> None:
    """FSDP2 on a 2-D (replicate x shard) mesh, i.e. HSDP: selecting its parameters must raise.
    Written to OUT/hsdp.rank<R>.json."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(model, mesh=mesh)
    try:
        select_parameters(model)  # what every callback does first
    except ValueError as err:
        message = str(err)
    else:
        message = None
    placements = [repr(pl) for pl in next(model.parameters()).placements]
    (out / f"hsdp.rank{dist.get_rank()}.json").write_text(json.dumps({"refused": message,
                                                                       "placements": placements}))


def main(mode: str, out: str, names: list[str]) -> None:
    if mode == "fsdp":
        allow_fsdp_on_cpu()
    out = Path(out)
    cases = {**CASES, "lora_arithmetic": lora_arithmetic(out),
             "swa_bn": lambda: (BNNet(), [SWACallback(start=1, copy_to_model_at_end=True)]),
             **{f"table-{row.name}": table_case(row) for row in SETTINGS}}
    for name in names or list(CASES):
        # <case>_resume: <case> stopped at step 2 and resumed; <case>_ga2: 2 micro-batches per step
        base = name.removesuffix("_resume").removesuffix("_ga2").removesuffix("_refused")
        if name.endswith("_refused"):  # <case>_refused: the case must refuse this mode at train begin
            refused_case(base, cases[base], mode, out)
            continue
        run_case(name, cases[base], mode, out, resume=name.endswith("_resume"),
                 accumulation=2 if name.endswith("_ga2") else 1)
    if mode == "fsdp":  # after the Trainers: they set up the process group
        hsdp_refusal(out)
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
