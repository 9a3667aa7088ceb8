"""Step time and extra memory of the SAM-family callbacks relative to plain training, same model, same run.

    python benchmarks/sam.py                   # default size, ~40 s on one CPU thread
    python benchmarks/sam.py --size medium     # 4x the tokens per step (~4 min unloaded, 10 here)
    python benchmarks/sam.py --size full       # GPT-2 small shape (124M), for a GPU or a large box

Two groups, each against its own baseline measured in the same process: full fine-tuning (plain,
SAM, ASAM, Momentum-SAM, random perturbation) and LoRA (plain LoRA, SAM, Flat-LoRA, LoRA-MGPO).
Step time: median over steps (after warm-up) of on_step_begin -> on_step_end, best of ``--rounds``
interleaved rounds; on CPU it is the training thread's CPU time with torch on one thread
(``--clock thread``), which other processes on a shared machine do not inflate.
Extra memory: what the callback holds across the step, measured from its own
buffers (SAM: the saved weights; one-pass: the fix-up lists), against the bytes of the perturbed
tensors. Goals (issue 4): exact SAM <= 2.1x, one-pass <= 1.1x, random perturbation with no
parameter-sized buffer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustft import MGPOCallback, MomentumSAMCallback, RandomPerturbationCallback, SAMCallback  # noqa: E402

SIZES = {
    "default": dict(n_embd=192, n_layer=4, n_head=4, vocab_size=2048, n_positions=64, batch=8, seq=64),
    "medium": dict(n_embd=256, n_layer=4, n_head=4, vocab_size=4096, n_positions=256, batch=8, seq=256),
    "full": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024, batch=8, seq=512),
}


CLOCK = time.perf_counter


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Clock(TrainerCallback):
    def __init__(self, cb=None):
        self.times, self.cb, self.extra = [], cb, 0

    def on_step_begin(self, *a, **k):
        self.t0 = CLOCK()
        if self.cb is not None and hasattr(self.cb, "_applied"):  # one-pass: fix-ups held during the step
            self.extra = max(self.extra, sum(f.nbytes() for *_, f in self.cb._applied))

    def on_step_end(self, *a, **k):
        self.times.append(CLOCK() - self.t0)


def build(size, lora):
    cfg = SIZES[size]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=cfg["n_embd"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            vocab_size=cfg["vocab_size"],
            n_positions=cfg["n_positions"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        )
    return model


def run(size, lora, factory, steps, device):
    cfg = SIZES[size]
    model = build(size, lora)
    cb = factory() if factory else None
    clock = Clock(cb)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg["batch"],
            max_steps=steps,
            learning_rate=1e-4,
            max_grad_norm=1.0,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
        )
        data = Tokens(cfg["batch"] * steps, cfg["seq"], cfg["vocab_size"])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[c for c in (cb, clock) if c])
        trainer.train()
    warm = max(2, steps // 5)
    step = statistics.median(clock.times[warm:])
    if isinstance(cb, SAMCallback):
        clock.extra = sum(p.numel() * p.element_size() for p in cb._params.values())
    target_bytes = sum(p.numel() * p.element_size() for p in cb._params.values()) if cb else 0
    return step, clock.extra, target_bytes


GROUPS = {
    False: {
        "plain": None,
        "sam": lambda: SAMCallback(rho=0.05),
        "asam": lambda: SAMCallback(rho=0.5, adaptive=True),
        "momentum_sam": lambda: MomentumSAMCallback(rho=0.3),
        "random (RWP)": lambda: RandomPerturbationCallback(rho=0.01),
    },
    True: {
        "plain LoRA": None,
        "sam (LoRA)": lambda: SAMCallback(rho=0.05),
        "flat-lora": lambda: RandomPerturbationCallback(rho=0.01),
        "mgpo": lambda: MGPOCallback(),  # default ρ = 0.05, β = 0.9; ρ does not change the cost
    },
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--clock",
        choices=("thread", "wall"),
        default="thread" if not torch.cuda.is_available() else "wall",
        help="thread: CPU time of the training thread with torch on 1 thread (robust to other load on a "
        "shared machine); wall: wall-clock time",
    )
    a = p.parse_args(argv)
    global CLOCK
    if a.clock == "thread":
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    print(
        f"size={a.size} {SIZES[a.size]} steps={a.steps} rounds={a.rounds} device={a.device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    for lora, variants in GROUPS.items():
        best = {}
        for _ in range(a.rounds):  # interleaved rounds: machine noise hits every variant alike
            for name, factory in variants.items():
                step, extra, target = run(a.size, lora, factory, a.steps, a.device)
                prev = best.get(name)
                best[name] = (step, extra, target) if prev is None or step < prev[0] else prev
        base = next(iter(best.values()))[0]
        head = ("variant", "step ms", "x plain", "extra MB", "perturbed MB", "extra/pert")
        print("\n{:<16} {:>9} {:>8} {:>9} {:>13} {:>10}".format(*head))
        for name, (step, extra, target) in best.items():
            frac = f"{extra / target:.3f}" if target else "-"
            row = (name, step * 1e3, step / base, extra / 2**20, target / 2**20, frac)
            print("{:<16} {:9.1f} {:8.2f} {:9.2f} {:13.2f} {:>10}".format(*row))


if __name__ == "__main__":
    main()
