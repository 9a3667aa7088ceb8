"""The LLM benchmark on a CUDA GPU with ``bf16=True``, plus bf16 correctness checks of EMA, SAM and WiSE-FT,
and the QLoRA path: the same on a 4-bit NF4 base (bitsandbytes) with its own checks.

    python benchmarks/gpu.py                          # on a machine with an NVIDIA GPU: checks + benchmark
    python benchmarks/gpu.py --checks-only            # the bf16 and QLoRA checks only (seconds)
    python benchmarks/gpu.py --device cpu --checks-only   # the same checks on CPU (tests the script)
    python benchmarks/gpu.py --skip-qlora             # without the QLoRA path
    python benchmarks/gpu.py --skip-moe               # without the MoE path

Without CUDA (and without ``--device cpu``) it prints why nothing ran and exits 0.

Checks, each on a small random Llama whose weights are bfloat16, trained by the ``Trainer`` with
``bf16=True``, against a float32 (or float64) reference computed here from the same weights:

* EMA: ``EMACallback``'s shadow (float32 for 16-bit weights) equals the float64 EMA of the recorded
  bf16 weight trajectory (relative error <= 1e-5; a bf16 shadow would be off by ~1e-3).
* SAM: ``SAMCallback``'s gradient (taken at w + ε) has cosine >= 0.99 with the float32 reference SAM
  gradient (ε = ρ·g/‖g‖ from the float32 gradient at w, then the gradient at w + ε), and is closer to it
  than to the plain gradient; after the SGD step the weights are exactly the bf16 SGD update of the
  start weights with that gradient, so the perturbation was undone exactly (w + ε − ε is not w in bf16).
* WiSE-FT: ``WiseFTCallback(alpha=0.5)`` leaves (θ_start + θ_end)/2 computed in float32 and rounded to
  bf16 (each element within one bf16 rounding, 2^-8 relative).

QLoRA checks (skipped, with the reason, when bitsandbytes is not installed), on a small random Llama loaded
in NF4 on the device:

* training: Flat-LoRA (its noise through the 4-bit layer's output) and Momentum-SAM with EMA give the same
  adapter as on the dequantized float copy of that base (worst tensor, relative error <= 1e-3);
* merge: ``merge_into_base`` on the saved NF4 base equals its dequantized weights + ΔW (relative to ‖ΔW‖,
  <= 1e-6); printed beside it, for the record, what PEFT's ``merge_and_unload`` into the 4-bit layers loses
  of ΔW (peft#2105) and how far the result is from a full-precision merge W0 + ΔW (NF4's error of W0).

MoE checks, on a small random Mixtral (fused 3-D experts):

* LoRA with ``target_parameters`` on the experts, trained in bf16 with EMA, then scaled by 0.5 with robustft's
  adapter algebra and loaded by PEFT: every expert's delta is half the trained one (relative error <= 1e-2);
* MC-SMoE (``merge_experts``, keep 2 of 4 experts, rank 8) on the device equals the same merge on CPU
  (relative error <= 1e-4); its time is printed.

Benchmark: ``benchmarks/llm.py``'s two parts on CUDA with bf16 autocast (float32 master weights): the
scores of every method in the ``--setting`` (default full) and the interleaved throughput rounds; then the
same on the NF4 base (``robustft demo --llm --4bit``) unless ``--skip-qlora``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_CUDA = (
    "benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False), so nothing was run. "
    "Run it on a machine with an NVIDIA GPU; `--device cpu --checks-only` runs the bf16 checks on CPU."
)


def tiny_llama(dtype, device: str, seed: int = 0):
    """A 2-layer random Llama (about 60k parameters) in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def token_data(n: int = 8, seq: int = 32, seed: int = 0):
    import torch
    from datasets import Dataset

    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def trainer_for(model, callbacks, device: str, out: str, steps: int, lr: float, optim: str = "adamw_torch",
                bf16: bool = True):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, optim=optim,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, bf16=bf16,
        use_cpu=device == "cpu", save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10**6,
        seed=0, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=token_data(), callbacks=callbacks)


def recorder(at: str):
    """A callback keeping float32 copies of the trainable weights (``at="weights"``, at each step end and
    at train begin) or of their gradients (``at="grads"``, before each optimizer step)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.start, self.steps = None, []

        def _copy(self, model, grads: bool):
            return {n: (p.grad if grads else p).detach().float().clone()
                    for n, p in model.named_parameters() if p.requires_grad}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = self._copy(model, False)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if at == "grads":
                self.steps.append(self._copy(model, True))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if at == "weights":
                self.steps.append(self._copy(model, False))

    return Recorder()


def check_ema(device: str, out: str) -> tuple[str, float, float]:
    import torch

    from robustft import EMACallback

    decay = 0.9
    model = tiny_llama(torch.bfloat16, device)
    ema = EMACallback(decay=decay, warmup=False, eval_with_ema=False, save_dir=None)
    rec = recorder("weights")
    trainer_for(model, [rec, ema], device, out, steps=6, lr=1e-2).train()
    ref = {n: w.double() for n, w in rec.steps[0].items()}  # the first update copies
    for weights in rec.steps[1:]:
        ref = {n: decay * ref[n] + (1 - decay) * weights[n].double() for n in ref}
    shadow = dict(zip(ema.params, ema.avg.tensors, strict=True))
    err = max(((shadow[n].double() - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    return "EMA shadow vs float64 EMA of the bf16 trajectory (max relative error)", err, 1e-5


def check_sam(device: str, out: str) -> list[tuple[str, float, float]]:
    import torch

    from robustft import SAMCallback

    rho, lr = 0.5, 0.1
    model = tiny_llama(torch.bfloat16, device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = recorder("grads")
    trainer_for(model, [SAMCallback(rho=rho), rec], device, out, steps=1, lr=lr, optim="sgd").train()
    g_sam = rec.steps[0]

    ref = tiny_llama(torch.float32, device)  # float32 reference from the same (bf16-valued) weights
    ref.load_state_dict({n: t.float() for n, t in start.items()})
    batch = {k: torch.tensor(v, device=device) for k, v in token_data()[:8].items()}

    def grads() -> dict[str, torch.Tensor]:
        ref.zero_grad()
        ref(**batch).loss.backward()
        return {n: p.grad.detach().clone() for n, p in ref.named_parameters()}

    g1 = grads()
    norm = torch.sqrt(sum((g * g).sum() for g in g1.values()))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.add_(g1[n], alpha=rho / norm.item())
    g2 = grads()

    def cos(a, b) -> float:
        dot = sum((a[n] * b[n]).sum() for n in a)
        sq_a, sq_b = sum((a[n] ** 2).sum() for n in a), sum((b[n] ** 2).sum() for n in b)
        return (dot / torch.sqrt(sq_a * sq_b)).item()

    after = dict(model.named_parameters())
    exact = sum(
        int(not torch.equal(after[n].detach(), start[n].add(g_sam[n].to(torch.bfloat16), alpha=-lr)))
        for n in start
    )
    return [
        ("SAM gradient vs float32 reference SAM gradient (1 - cosine)", 1 - cos(g_sam, g2), 0.01),
        ("SAM gradient: 1 - cos to the SAM reference minus 1 - cos to the plain gradient",
         (1 - cos(g_sam, g2)) - (1 - cos(g_sam, g1)), 0.0),
        ("weights after the step != w - lr*g_SAM in bf16 (tensors)", float(exact), 0.0),
    ]


def check_wise_ft(device: str, out: str) -> tuple[str, float, float]:
    import torch

    from robustft import WiseFTCallback

    model = tiny_llama(torch.bfloat16, device)
    rec = recorder("weights")
    trainer_for(model, [rec, WiseFTCallback(alpha=0.5)], device, out, steps=4, lr=1e-2).train()
    end = rec.steps[-1]
    worst = 0.0
    for n, p in model.named_parameters():
        ref = 0.5 * rec.start[n] + 0.5 * end[n]
        worst = max(worst, ((p.detach().float() - ref).abs() / (ref.abs() + 1e-30)).max().item())
    moved = any(not torch.equal(p.detach().float(), end[n]) for n, p in model.named_parameters())
    name = "WiSE-FT θ(0.5) vs float32 midpoint (max relative error per element)"
    return name, worst if moved else math.inf, 2**-8


def nf4_base(root: Path) -> Path:
    """The small random Llama saved in float32 (``tiny_llama``: hidden 64, bitsandbytes' 4-bit block)."""
    import torch

    tiny_llama(torch.float32, "cpu").save_pretrained(root / "base")
    return root / "base"


def load_nf4(path: Path, device: str, dequantized: bool = False):
    """``path`` loaded in NF4 (float32 compute) on ``device``; ``dequantized``: made float again
    (transformers' ``dequantize``: its weights are exactly the 4-bit ones)."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map=device)
    return model.dequantize(dtype=torch.float32) if dequantized else model


def check_qlora_training(device: str, out: str) -> tuple[str, float, float]:
    import torch
    from peft import LoraConfig, get_peft_model

    from robustft import EMACallback, MomentumSAMCallback, RandomPerturbationCallback

    base = nf4_base(Path(out))
    adapters = []
    for dequantized in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_nf4(base, device, dequantized),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        callbacks = [RandomPerturbationCallback(rho=0.1, seed=1, lora=True), MomentumSAMCallback(rho=0.1),
                     EMACallback(decay=0.5)]
        trainer_for(model, callbacks, device, out, steps=4, lr=1e-2, bf16=False).train()
        adapters.append({n: p.detach().float().cpu() for n, p in model.named_parameters() if ".lora_" in n})
    got, want = adapters
    err = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    name = "QLoRA: Flat-LoRA + Momentum-SAM + EMA on NF4 vs the dequantized base (worst relative error)"
    return name, err, 1e-3


def check_qlora_merge(out: str) -> list[tuple[str, float, float]]:
    """The merge (offline, CPU): robustft's exact one, PEFT's re-quantized one, the full-precision one."""
    import statistics

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from robustft.lora import merge_into_base, read_adapter

    root = Path(out)
    base = root / "base"
    load_nf4(base, "cpu").save_pretrained(root / "nf4")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # ΔW about 6% of W, like a trained adapter's
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.01))
    model.save_pretrained(root / "adapter")
    deltas = {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
              for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    full = dict(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), root / "adapter")
                .merge_and_unload().named_modules())
    ours = dict(LlamaForCausalLM.from_pretrained(
        merge_into_base(read_adapter(root / "adapter"), root / "nf4", root / "merged", overwrite=True))
        .named_modules())
    nf4 = dict(load_nf4(root / "nf4", "cpu").named_modules())
    peft = dict(PeftModel.from_pretrained(load_nf4(root / "nf4", "cpu"), root / "adapter").merge_and_unload()
                .named_modules())

    def dequantized(weight):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    exact, lost, from_full = [], [], []
    for module, delta in deltas.items():
        want = dequantized(nf4[module].weight) + delta
        exact.append(((ours[module].weight.detach() - want).norm() / delta.norm()).item())
        lost.append(((dequantized(peft[module].weight) - want).norm() / delta.norm()).item())
        w_full = full[module].weight.detach()
        from_full.append(((ours[module].weight.detach() - w_full).norm() / w_full.norm()).item())
    return [
        ("QLoRA merge: robustft vs dequantized W + ΔW (worst module, relative to ‖ΔW‖)", max(exact), 1e-6),
        ("(record) PEFT merge_and_unload into NF4 vs dequantized W + ΔW (median, relative to ‖ΔW‖)",
         statistics.median(lost), math.inf),
        ("(record) robustft merge vs full-precision W0 + ΔW (median, relative to ‖W0 + ΔW‖)",
         statistics.median(from_full), math.inf),
    ]


def qlora_checks(device: str, out: str) -> list[tuple[str, float, float]]:
    """The QLoRA rows, or none (and why) without bitsandbytes."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print("QLoRA checks skipped: bitsandbytes is not installed (pip install 'robustft[qlora]')")
        return []
    return [check_qlora_training(device, out), *check_qlora_merge(out)]


def tiny_mixtral(dtype, device: str, seed: int = 0):
    """A 2-layer random Mixtral (4 fused experts, top-2) in ``dtype`` on ``device``."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    return MixtralForCausalLM(config).to(device=device, dtype=dtype)


def check_moe_lora(device: str, out: str) -> tuple[str, float, float]:
    """A PEFT LoRA on the fused experts (``target_parameters``) trained in bf16 with EMA; the adapter scaled
    by 0.5 (``robustft lora scale``'s algebra, written, loaded by PEFT) gives half of each expert's delta."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from robustft import EMACallback
    from robustft.lora.compose import compose_adapters
    from robustft.lora.io import read_adapter, write_adapter

    base = tiny_mixtral(torch.float32, "cpu")
    base.save_pretrained(os.path.join(out, "moe_base"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(tiny_mixtral(torch.bfloat16, device), config)
    ema = EMACallback(decay=0.5, copy_to_model_at_end=True)
    trainer_for(model, [ema], device, out, steps=4, lr=1e-2).train()
    model.save_pretrained(os.path.join(out, "moe_adapter"))
    half = write_adapter(compose_adapters([read_adapter(os.path.join(out, "moe_adapter"))], [0.5]),
                         os.path.join(out, "moe_half"), overwrite=True)
    loaded = PeftModel.from_pretrained(base.to(torch.bfloat16), str(half)).to(device)
    err = 0.0
    for trained, got in zip(model.base_model.model.model.layers, loaded.base_model.model.model.layers):
        for a, b in ((trained.mlp.experts, got.mlp.experts),
                     (trained.mlp.experts.base_layer, got.mlp.experts.base_layer)):
            want = 0.5 * a.get_delta_weight("default").float()
            assert want.abs().max() > 0, "the adapter did not train"
            diff = (b.get_delta_weight("default").float() - want).abs().max() / want.abs().max()
            err = max(err, diff.item())
    return "MoE LoRA (target_parameters) x 0.5 vs half of each expert's trained delta (max rel.)", err, 1e-2


def check_mc_smoe(device: str) -> tuple[str, float, float]:
    """MC-SMoE (keep 2 of 4 experts, rank 8) on ``device`` equals the same merge on CPU (relative error)."""
    import time

    import torch

    from robustft.merge import merge_experts

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (8, 16), generator=g)} for _ in range(2)]
    ref = tiny_mixtral(torch.float32, "cpu")
    merge_experts(ref, batches, keep=2, rank=8)
    model = tiny_mixtral(torch.float32, device)
    start = time.perf_counter()
    report = merge_experts(model, [{k: v.to(device) for k, v in b.items()} for b in batches], keep=2, rank=8)
    seconds = time.perf_counter() - start
    print(f"MC-SMoE on {device}: {seconds:.2f} s, expert parameters stored x{report.ratio:.3f}")
    want = dict(ref.named_parameters())
    return ("MC-SMoE (keep 2 of 4, rank 8) on the device vs on CPU (max relative)",
            max(((p.detach().cpu() - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item()
                for n, p in model.named_parameters()), 1e-4)


def moe_checks(device: str, out: str) -> list[tuple[str, float, float]]:
    """The MoE rows: LoRA on fused experts in bf16, MC-SMoE."""
    return [check_moe_lora(device, out), check_mc_smoe(device)]


def run_checks(device: str, qlora: bool = True, moe: bool = True) -> bool:
    from robustft.demos.console import format_table

    with tempfile.TemporaryDirectory() as out:
        results = [check_ema(device, out), *check_sam(device, out), check_wise_ft(device, out)]
        if qlora:
            results += qlora_checks(device, out)
        if moe:
            results += moe_checks(device, out)
    rows = [[name, f"{value:.3g}", f"<= {tol:g}", "ok" if value <= tol else "FAILED"]
            for name, value, tol in results]
    print(f"\nbf16, QLoRA and MoE correctness checks on {device}:")
    print(format_table(["check", "value", "bound", ""], rows))
    return all(value <= tol for _, value, tol in results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--checks-only", action="store_true")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-qlora", action="store_true", help="leave out the QLoRA checks and NF4 benchmark")
    p.add_argument("--skip-moe", action="store_true", help="leave out the MoE checks (LoRA, MC-SMoE)")
    p.add_argument("--setting", choices=["full", "fast"], default="full")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput run")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_gpu_benchmark"))
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    ok = True
    if not args.skip_checks:
        ok = run_checks(args.device, qlora=not args.skip_qlora, moe=not args.skip_moe)
    if args.checks_only:
        return 0 if ok else 1
    from dataclasses import replace

    from benchmarks.llm import throughput, throughput_table
    from robustft.demos import llm as demo_llm

    cfg = demo_llm.FULL if args.setting == "full" else demo_llm.FAST
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    overrides = {"use_cpu": args.device == "cpu", "bf16": True}
    runs = [("", cfg, Path(args.out))]
    if not args.skip_qlora and importlib.util.find_spec("bitsandbytes") is not None:
        runs.append((" on the NF4 base (QLoRA)", replace(cfg, bits=4), Path(args.out) / "nf4"))  # demo --4bit
    for label, setting, out in runs:
        result = demo_llm.run_llm_demo(out, setting, progress=False, train_overrides=overrides)
        per = throughput(replace(setting, steps=args.steps), args.rounds, device=args.device, bf16=True)
        print(f"\n{name}{label}, bf16 autocast, setting {args.setting}:\n")
        print(result.table())
        print(result.summary())
        print(f"\nthroughput{label}, {args.rounds} interleaved rounds of {args.steps} steps:\n")
        print(throughput_table(per))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
