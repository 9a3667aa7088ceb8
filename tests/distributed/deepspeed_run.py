"""Launched by tests/distributed/test_deepspeed.py with torchrun (2 CPU ranks): every callback under one mode.

``python -m torch.distributed.run --nproc_per_node 2 deepspeed_run.py MODE OUT`` with MODE one of
``ddp`` (the reference: plain DDP on CPU), ``zero1``, ``zero2``, ``zero3`` (DeepSpeed on CPU, needs
``DS_ACCELERATOR=cpu``). Each rank writes OUT/rank<R>.json (what ran, refusal messages, metrics)
and OUT/rank<R>.safetensors: full (gathered) weights and averages, and brute-force references
computed here from the full weights recorded after every optimizer step.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback

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
from tests.distributed.harness import allow_deepspeed_on_cpu, finish  # noqa: E402
from tests.tiny import lm_dataset, tiny_llama, training_args  # noqa: E402

STEPS = 4


def ds_config(stage: int, persistence: float = 0) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000}
    if stage == 3:  # persistence 0: partition every parameter, however small (see shared/FACTS.md); the
        # prefetch/reuse defaults keep parameters gathered between forwards (robustft must release them)
        zero.update(stage3_param_persistence_threshold=persistence)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero}


def full_weights(model, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Every (trainable) weight in full, on every rank (gathered from ZeRO-3 partitions)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def full_from_partition(param, shard: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 flat partition (of a copy of ``param``, padding left out) -> the full tensor: pad to
    DeepSpeed's partition size, all-gather, concat, unpad."""
    if not hasattr(param, "ds_id"):
        return shard
    padded = torch.zeros(param.ds_tensor.ds_numel, dtype=shard.dtype)
    padded[: shard.numel()] = shard
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)


class StepBeginRecorder(TrainerCallback):
    """All full weights at the first forward of each step: the weights a one-pass callback's gradient is
    taken at (the perturbation is applied around each micro-batch, inside ``training_step``)."""

    def __init__(self):
        self.points, self._want, self._hook = [], False, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def first_forward(module, inputs):
            if self._want:
                self._want = False
                # inside DeepSpeed's forward nothing may be gathered: the full weights from the partitions
                self.points.append({n: full_from_partition(p, p.ds_tensor.detach().flatten()).clone()
                                    if hasattr(p, "ds_id") else p.detach().clone()
                                    for n, p in module.named_parameters()})  # fmt: skip

        self._hook = model.register_forward_pre_hook(first_forward)

    def on_step_begin(self, args, state, control, **kwargs):
        self._want = True

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


class Recorder(TrainerCallback):
    """Full weights at train begin and after every optimizer step (an independent record)."""

    def __init__(self):
        self.start, self.points = None, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = full_weights(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.points.append(full_weights(model))


def make_trainer(mode: str, out: str, callbacks, persistence: float = 0, model=None, **overrides) -> Trainer:
    extra = {} if mode == "ddp" else {"use_cpu": False, "deepspeed": ds_config(int(mode[-1]), persistence)}
    kwargs = dict(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_grad_norm=1.0, **extra)
    kwargs.update(overrides)
    return Trainer(model=model if model is not None else tiny_llama(), args=training_args(out, **kwargs),
                   train_dataset=lm_dataset(), eval_dataset=lm_dataset(n=16, seed=1), callbacks=callbacks)


def check_mode(trainer: Trainer, mode: str) -> dict:
    """What really ran: the engine and its ZeRO stage; for ZeRO-3, that parameters are partitioned."""
    info = {"deepspeed": bool(trainer.is_deepspeed_enabled)}
    if trainer.is_deepspeed_enabled:
        import deepspeed

        engine = trainer.model_wrapped
        info["engine"] = isinstance(engine, deepspeed.DeepSpeedEngine)
        info["stage"] = int(engine.zero_optimization_stage())
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        info["partitioned"] = all(  # (between forwards a parameter may still hold its gathered copy)
            hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in params
        )
    return info


def refusal(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def row_wise_on_partitions(mode: str, out: str, info: dict, put) -> None:
    """The row-wise methods, which ZeRO-3 computes from flat partitions (compared with DDP by the test).

    RWP and Flat-LoRA at learning rate 0, so the weights stay the start's (bit-exact if every perturbation
    is undone): each step's perturbation is the perturbed weights minus the start. WiSE-FT with slerp.
    """
    from peft import LoraConfig, get_peft_model

    def perturbations(name: str, model, callback) -> None:
        perturbed = StepBeginRecorder()
        trainer = make_trainer(mode, os.path.join(out, name), [callback, perturbed], model=model,
                               learning_rate=0.0)
        start = full_weights(model, trainable_only=False)
        trainer.train()
        info[name] = check_mode(trainer, mode)
        info[f"{name}_exact"] = all(torch.equal(a, b) for a, b in
                                    zip(start.values(), full_weights(model, trainable_only=False).values()))
        info[f"{name}_norms"] = [h["rwp/perturbation_norm"] for h in trainer.state.log_history
                                 if "rwp/perturbation_norm" in h]
        put(f"{name}_w", start)
        for step, weights in enumerate(perturbed.points):
            put(f"{name}_eps{step}", {n: weights[n] - start[n] for n in start})

    def spread_rows(model):
        """Row i of every matrix times 1 + i mod 7: row norms far apart, so a row mix-up shows."""
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_((1.0 + torch.arange(p.shape[0]) % 7).reshape(-1, 1))
        return model

    perturbations("rwp_rows", spread_rows(tiny_llama()), RandomPerturbationCallback(rho=0.05, seed=3))
    lora_model = get_peft_model(spread_rows(tiny_llama()), LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # B ≠ 0: W₀+sBA ≠ W₀
    perturbations("flat_lora", lora_model, RandomPerturbationCallback(rho=0.05, seed=3))

    slerp = make_trainer(mode, os.path.join(out, "slerp"), [WiseFTCallback(alpha=0.5, method="slerp")])
    slerp.train()
    info["slerp"] = check_mode(slerp, mode)
    put("slerp", full_weights(slerp.model))


def main(mode: str, out: str) -> None:
    if mode != "ddp":
        allow_deepspeed_on_cpu()
    info: dict = {"mode": mode, "out": out}
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, weights: dict[str, torch.Tensor]) -> None:
        tensors.update({f"{prefix}.{n}": t.contiguous() for n, t in weights.items()})

    # 1. plain training: the baseline every mode must agree on
    rec = Recorder()
    plain = make_trainer(mode, os.path.join(out, "plain"), [rec])
    plain.train()
    info["plain"] = check_mode(plain, mode)
    put("plain", rec.points[-1])

    # 2. one-pass perturbations (= DDP under ZeRO-1/2; ZeRO-3 draws per partition), SAM and LoRA-MGPO
    # (refused by name: SAM replays micro-batches, MGPO reads the optimizer's momentum per parameter)
    for name, make in {
        "rwp": lambda: RandomPerturbationCallback(rho=0.05, seed=3),
        "msam": lambda: MomentumSAMCallback(rho=0.3),
        "mgpo": lambda: MGPOCallback(rho=0.05),
        "sam": lambda: SAMCallback(rho=0.05),
    }.items():
        rec = Recorder()
        trainer = make_trainer(mode, os.path.join(out, name), [make(), rec],
                               save_strategy="steps", save_steps=2)
        info[f"{name}_refused"] = refusal(trainer.train)
        if info[f"{name}_refused"] is None:
            put(name, rec.points[-1])

    if mode != "ddp":
        # 3. averaging: four callbacks at once, saving their states at step 2 for the resume below; an
        # evaluation with the EMA weights swapped in after every step must leave training as it was
        decay, momentum = 0.7, 0.8
        cbs = {"ema": EMACallback(decay=decay, eval_with_ema=True),
               "swa": SWACallback(start=2, eval_with_swa=False, save_dir=None),
               "lawa": LAWACallback(k=2, update_every=1, eval_with_lawa=False, save_dir=None),
               "momentum": MomentumInterpolationCallback(momentum=momentum, eval_with_slow=False,
                                                         save_dir=None)}
        rec = Recorder()
        avg_out = os.path.join(out, "avg")
        trainer = make_trainer(mode, avg_out, [*cbs.values(), rec], save_strategy="steps", save_steps=2,
                               eval_strategy="steps", eval_steps=1)
        trainer.train()
        put("avg_live", rec.points[-1])
        info["ema_eval_losses"] = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        info["avg"] = check_mode(trainer, mode)
        points = rec.points
        ema = points[0]
        for p in points[1:]:
            ema = {n: decay * ema[n] + (1 - decay) * p[n] for n in p}
        slow = rec.start
        for p in points:
            slow = {n: momentum * slow[n] + (1 - momentum) * p[n] for n in p}
        brute = {"ema": ema, "momentum": slow,
                 "swa": {n: sum(p[n] for p in points[1:]) / (len(points) - 1) for n in ema},
                 "lawa": {n: (points[-1][n] + points[-2][n]) / 2 for n in ema}}
        live = points[-1]
        info["ema_distance"] = cbs["ema"].distance()
        info["ema_distance_brute"] = float(torch.sqrt(sum(((ema[n] - live[n]) ** 2).sum() for n in ema)))

        def averages(callbacks) -> dict[str, dict[str, torch.Tensor]]:
            result = {}
            for key, cb in callbacks.items():
                avg = cb.average()
                result[key] = {n: full_from_partition(cb.params[n], t)
                               for n, t in zip(avg.names, avg.tensors)}
            return result

        for key, weights in averages(cbs).items():
            put(key, weights)
            put(f"brute_{key}", brute[key])
        info["live_unchanged"] = all(torch.equal(a, b) for a, b in zip(full_weights(trainer.model).values(),
                                                                     live.values()))
        # 4. resume from checkpoint-2: the averages must equal the uninterrupted run's
        again = {"ema": EMACallback(decay=decay, eval_with_ema=False, save_dir=None),
                 "swa": SWACallback(start=2, eval_with_swa=False, save_dir=None),
                 "lawa": LAWACallback(k=2, update_every=1, eval_with_lawa=False, save_dir=None),
                 "momentum": MomentumInterpolationCallback(momentum=momentum, eval_with_slow=False,
                                                           save_dir=None)}
        resumed = make_trainer(mode, avg_out, list(again.values()))
        resumed.train(resume_from_checkpoint=os.path.join(avg_out, "checkpoint-2"))
        for key, weights in averages(again).items():
            put(f"resumed_{key}", weights)
        info["state_files"] = sorted(os.listdir(os.path.join(avg_out, "checkpoint-2", "robustft")))

    # 5. WiSE-FT: a sweep over α on the eval set (loss), then the fixed α left in the model; a run resumed
    # from its step-2 checkpoint (start weights from the saved state) must leave the same θ(α)
    alpha, rec = 0.3, Recorder()
    wise_cb = WiseFTCallback(alpha=alpha, alphas=(0.0, 0.5, 1.0),
                             eval_datasets={"id": lm_dataset(n=16, seed=1)},
                             metric="loss", greater_is_better=False, progress=False)
    wise_out = os.path.join(out, "wise")
    wise = make_trainer(mode, wise_out, [wise_cb, rec], save_strategy="steps", save_steps=2)
    wise.train()
    resumed = make_trainer(mode, wise_out, [WiseFTCallback(alpha=alpha, save_curve=False)])
    resumed.train(resume_from_checkpoint=os.path.join(wise_out, "checkpoint-2"))
    put("wise_resumed", full_weights(resumed.model))
    info["wise"] = check_mode(wise, mode)
    put("wise", full_weights(wise.model))
    put("wise_ref", {n: (1 - alpha) * rec.start[n] + alpha * rec.points[-1][n] for n in rec.start})
    info["wise_curve"] = {str(a): wise_cb.curve.value("id", a) for a in (0.0, 0.5, 1.0)}
    info["wise_files"] = sorted(f for f in os.listdir(os.path.join(out, "wise")) if f.startswith("wise_ft"))

    # 6. LoRA arithmetic: the trained adapter (read from partitions under ZeRO-3) written by rank 0
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    lora_out = os.path.join(out, "lora")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora = make_trainer(mode, lora_out, [LoRAArithmeticCallback({"self": 0.5})], model=peft_model,
                        learning_rate=5e-2)
    lora.train()
    info["lora"] = check_mode(lora, mode)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            trained = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    else:
        trained = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    put("lora_trained", trained)

    if mode in ("ddp", "zero3"):
        row_wise_on_partitions(mode, out, info, put)
    if mode == "zero3":
        # the shipped ZeRO-3 config (examples/accelerate/ds_zero3.json) with EMA + a row-wise perturbation
        with open("examples/accelerate/ds_zero3.json") as f:
            config = json.load(f)
        callbacks = [EMACallback(decay=0.9, save_dir=None), RandomPerturbationCallback(rho=0.05)]
        shipped = make_trainer(mode, os.path.join(out, "shipped"), callbacks, deepspeed=config)
        info["shipped_refused"] = refusal(shipped.train)
        info["shipped"] = check_mode(shipped, mode)
        persist = make_trainer(mode, os.path.join(out, "persist"), [EMACallback(decay=0.9, save_dir=None)],
                               persistence=1e5)
        info["persistent_refused"] = refusal(persist.train)

    rank = dist.get_rank()
    info["world_size"] = dist.get_world_size()
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f, indent=1)
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
