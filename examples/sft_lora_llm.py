"""Fine-tune a causal LM with LoRA under TRL's SFTTrainer, with EMA, one-pass SAM and WiSE-FT on the adapter.

    python examples/sft_lora_llm.py        # --tiny: random-init Llama + tokenizer + data, CPU, < 1 min
    python examples/sft_lora_llm.py --model PATH --data train.jsonl --eval-id id.jsonl --eval-shift ood.jsonl
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/sft_lora_llm.py --model PATH ...

Three callbacks on an unchanged ``trl.SFTTrainer`` (LoRA from ``peft_config``):

* ``EMACallback`` keeps an exponential moving average of the adapter (the trainable LoRA factors only)
  and saves it as a PEFT adapter folder, ``<output-dir>/ema``.
* ``RandomPerturbationCallback`` (Flat-LoRA, the default here) or ``MomentumSAMCallback`` (``--sam msam``):
  one forward/backward per step, the gradient taken at perturbed weights. Flat-LoRA is the default for
  LoRA because it perturbs the *merged* weight W0 + s·BA (the space the model actually lives in), where
  a perturbation of the small factors A, B alone says little about flatness of the full weights
  (Flat-LoRA, Zhu et al., 2024); it also needs no optimizer momentum, so it acts from the first step.
* ``WiseFTCallback`` sweeps α over an in-distribution and a shifted eval set when training ends,
  chooses α on the in-distribution eval loss only, and leaves θ(α*) in the model: for LoRA this is
  exactly B ← α*·B_end (W0 + α*·s·B_end·A_end), so the final adapter saved in ``<output-dir>/adapter``
  is the WiSE-FT model. The curve is in ``<output-dir>/wise_ft.{json,csv,png}``.

Data: JSON/JSONL files with a ``text`` field, loaded with ``datasets.load_dataset("json", ...)``. In
tiny mode (the default when no ``--model`` is given) a random-init 2-layer Llama, a word-level tokenizer
and a small corpus (in-distribution: one family of sentence templates; shifted: another) are written to
``<output-dir>/tiny/`` and loaded back through the same ``from_pretrained`` / ``load_dataset`` path.
Under ``accelerate launch`` only the main process prints and writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from robustft import EMACallback, MomentumSAMCallback, RandomPerturbationCallback, WiseFTCallback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# -- tiny mode: a corpus, a word-level tokenizer and a random-init Llama, all written to disk ------------
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
COLORS = ["red", "blue", "green", "black", "white", "yellow"]
THINGS = ["car", "hat", "cup", "book", "lamp", "chair", "ball", "coat"]
ID_TEMPLATES = ["{n} has a {c} {t} .", "{n} likes the {c} {t} .", "{n} bought a {c} {t} today ."]
SHIFT_TEMPLATES = ["the {t} of {n} is {c} .", "a {c} {t} is what {n} likes .", "today {n} sold the {c} {t} ."]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def sentences(templates: Sequence[str], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"text": ...}`` drawn from ``templates`` with random slot fillers."""
    rng = random.Random(seed)
    return [
        {"text": rng.choice(templates).format(n=rng.choice(NAMES), c=rng.choice(COLORS),
                                              t=rng.choice(THINGS))}
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def build_tiny(root: Path, hidden: int = 48) -> tuple[Path, dict[str, Path]]:
    """Write a random-init Llama + tokenizer (``root/model``) and train/id/shift JSONL (``root/data``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data_dir = root / "model", root / "data"
    data = {"train": data_dir / "train.jsonl", "id": data_dir / "id.jsonl", "shift": data_dir / "shift.jsonl"}
    if (model_dir / "config.json").is_file() and all(p.is_file() for p in data.values()):
        return model_dir, data
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data["train"], sentences(ID_TEMPLATES, 512, seed=0))
    write_jsonl(data["id"], sentences(ID_TEMPLATES, 48, seed=1))
    write_jsonl(data["shift"], sentences(SHIFT_TEMPLATES, 48, seed=2))

    words = sorted({w for t in ID_TEMPLATES + SHIFT_TEMPLATES for w in t.split() if "{" not in w})
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words + NAMES + COLORS + THINGS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=root))
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, model_dir)
    return model_dir, data


# -- the run ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local folder (or hub id, if you are online) of a causal LM; "
                                   "without it: --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="build a random-init tiny Llama (the default without --model)")
    p.add_argument("--data", help="train JSON/JSONL with a 'text' field (tiny mode: generated)")
    p.add_argument("--eval-id", help="in-distribution eval JSON/JSONL (default: 10%% held out of --data)")
    p.add_argument("--eval-shift", help="shifted eval JSON/JSONL (optional outside tiny mode)")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "robustft_sft_lora_llm"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--sam", choices=["flat-lora", "msam", "none"], default="flat-lora")
    p.add_argument("--rho", type=float, default=None, help="perturbation radius (Flat-LoRA 0.05, MSAM 0.3)")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    p.add_argument("--cpu", action="store_true", help="train on CPU (the default when no GPU is found)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiny = args.tiny or args.model is None
    if args.tiny and args.model is not None:
        p.error("--tiny builds its own model; do not also give --model")
    return args


def load_json(path: str | os.PathLike):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return load_dataset("json", data_files=str(path), split="train")


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence = ()) -> dict:
    """Run the fine-tune; returns the summary (plus ``trainer`` and the callbacks, for tests)."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(1, args.steps // 6), save_strategy="no", eval_strategy="no", report_to=[],
        max_length=args.max_length, dataset_text_field="text", bf16=args.bf16, seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0,
        # on a machine without an accelerator, say so: a multi-process launch then runs DDP over gloo
        use_cpu=args.cpu or not (torch.cuda.is_available() or torch.xpu.is_available()),
    )
    model_path, data = args.model, {"train": args.data, "id": args.eval_id, "shift": args.eval_shift}
    if args.tiny:
        with config.main_process_first(desc="tiny model and data"):  # rank 0 writes, the others then read
            model_dir, generated = build_tiny(out / "tiny")
        model_path = str(model_dir)
        data = {k: v if (v is not None or args.data) else str(generated[k]) for k, v in data.items()}
    elif args.data is None:
        raise ValueError("--data: give a train JSON/JSONL with a 'text' field (or use --tiny)")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if args.bf16 else None)
    train = load_json(data["train"])
    if data["id"] is None:
        split = train.train_test_split(test_size=0.1, seed=args.seed)
        train, eval_sets = split["train"], {"id": split["test"]}
    else:
        eval_sets = {"id": load_json(data["id"])}
    if data["shift"] is not None:
        eval_sets["shifted"] = load_json(data["shift"])

    sam = None
    if args.sam == "flat-lora":
        sam = RandomPerturbationCallback(rho=args.rho or 0.05, lora=True, seed=args.seed)
    elif args.sam == "msam":
        sam = MomentumSAMCallback(rho=args.rho or 0.3)
    ema = EMACallback(decay=args.ema_decay, warmup=True)  # averages the trainable (LoRA) tensors only
    wise = WiseFTCallback(eval_datasets=eval_sets, id_dataset="id", metric="eval_loss",
                          greater_is_better=False, alphas=args.alphas, progress=False)
    callbacks = [ema, *([sam] if sam else []), wise, *extra_callbacks]  # any order works
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=eval_sets, processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                               target_modules=args.target_modules, task_type="CAUSAL_LM"),
        callbacks=callbacks,
    )
    trainer.train()  # the model now holds θ(α*)
    trainer.save_model(str(out / "adapter"))  # the WiSE-FT adapter (main process writes)

    curve = wise.curve
    with ema.averaged_weights():
        ema_id_loss = trainer.evaluate(eval_dataset=eval_sets["id"], metric_key_prefix="ema")["ema_loss"]
    alphas_per_rank = [curve.chosen_alpha]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        alphas_per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(alphas_per_rank, curve.chosen_alpha)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    norms = [v for h in trainer.state.log_history for k, v in h.items() if k.endswith("/perturbation_norm")]
    summary = {
        "world_size": trainer.args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "chosen_alpha": curve.chosen_alpha,
        "chosen_alpha_per_rank": alphas_per_rank,
        "eval_loss": {name: {"alpha0": curve.value(name, 0.0) if 0.0 in curve.alphas else None,
                             "chosen": curve.value(name, curve.chosen_alpha)} for name in curve.results},
        "ema_id_loss": ema_id_loss,
        "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "sam": args.sam,
        "perturbation_norm_last": norms[-1] if norms else None,
        "adapter_dir": str(out / "adapter"),
        "ema_adapter_dir": str(out / "ema"),
        "curve": str(out / "wise_ft.json"),
    }
    if trainer.is_world_process_zero():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        ev = summary["eval_loss"]
        chosen = curve.chosen_alpha
        print(f"WiSE-FT chose alpha={chosen:g} on 'id' eval loss (world size {summary['world_size']})")
        for name, v in ev.items():
            start = "n/a" if v["alpha0"] is None else f"{v['alpha0']:.4f}"
            print(f"  {name:8s} eval loss: alpha=0 {start}  ->  alpha={chosen:g} {v['chosen']:.4f}")
        print(f"  EMA adapter id eval loss {ema_id_loss:.4f}")
        print(f"WiSE-FT adapter saved to {summary['adapter_dir']}")
        print(f"EMA adapter saved to {summary['ema_adapter_dir']}; curve in {summary['curve']}")
    return {**summary, "trainer": trainer, "callbacks": {"wise": wise, "ema": ema, "sam": sam}}


if __name__ == "__main__":
    main()["trainer"].accelerator.end_training()  # destroys the process group
    # gloo (CPU) only: a worker thread frees the last collective's tensors once it gets the GIL; if the
    # interpreter is shutting down by then, the process aborts ("terminate called without an active
    # exception") after every file was written (pytorch/pytorch#179291). Sleeping releases the GIL.
    time.sleep(0.1)
