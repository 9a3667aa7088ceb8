"""LoRA arithmetic end to end, offline on CPU in a few seconds.

1. Build a tiny Llama from a config and save it (stands in for your base model).
2. Train an "unwanted" LoRA adapter on one synthetic behaviour and save it.
3. Train a new adapter on the wanted behaviour with LoRAArithmeticCallback, which at the end
   writes  output_dir/composed = trained - 0.5 * unwanted  and evaluates it with the Trainer.
4. Offline: compress the composite to rank 4 and check, from the factors alone, how much of ΔW
   it keeps; then write it as an adapter PEFT loads.

    python examples/lora_arithmetic.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from robustft import LoRAArithmeticCallback, compose_adapters, read_adapter, write_adapter


def sequences(offset: int, n: int = 32, length: int = 16) -> Dataset:
    """Token i+1 follows token i (mod 64), starting at random points; ``offset`` shifts the rule."""
    g = torch.Generator().manual_seed(offset)
    starts = torch.randint(0, 64, (n, 1), generator=g)
    ids = ((starts + offset * torch.arange(length)) % 64).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def train(base: Path, data: Dataset, out: Path, callbacks=()) -> Trainer:
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    args = TrainingArguments(
        str(out), max_steps=30, per_device_train_batch_size=8, learning_rate=5e-2, report_to=[],
        save_strategy="no", use_cpu=True, logging_steps=10, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=list(callbacks)
    )
    for cb in callbacks:
        cb.attach(trainer)
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA arithmetic example")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="robustft-lora-"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "base")

    unwanted = train(root / "base", sequences(offset=3), root / "unwanted_run")
    unwanted.model.save_pretrained(root / "unwanted")

    cb = LoRAArithmeticCallback({"self": 1.0, str(root / "unwanted"): -0.5}, name="composed", evaluate=True)
    trainer = train(root / "base", sequences(offset=1), root / "run", callbacks=[cb])
    print(f"trained adapter eval loss:   {trainer.evaluate()['eval_loss']:.3f}")
    print(f"composite ({cb.output_path.name}) eval loss: {cb.metrics['composed_loss']:.3f}")

    composite = read_adapter(cb.output_path)
    small = compose_adapters([composite], rank=4)
    module = next(iter(composite.deltas))
    sv = composite.deltas[module].singular_values()
    kept = float(sv[:4].square().sum() / sv.square().sum())
    print(
        f"{module}: rank {composite.deltas[module].rank} -> 4 keeps {kept:.1%} of ||ΔW||² (from the factors)"
    )
    write_adapter(small, root / "composed_r4", overwrite=True)
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), root / "composed_r4")
    print(f"wrote {root / 'composed_r4'} (loads with PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()
