"""Launched by tests/distributed/test_callbacks.py: the sparse / LP-FT / shrink-perturb / DaWin /
EMA-reference callbacks on 1 rank or 2 DDP ranks (CPU, gloo).

argv: OUT. The global batch is the same in both modes (8 samples; 4 for DPO), so both take the same steps.
Rank R writes OUT/<case>/rank<R>.safetensors: the trainable weights at the start and the end, the weights
after every optimizer step (``step<k>.<name>``) and the case's own tensors (``mask.<name>``, ``ref.<name>``),
with the mode that ran (the Trainer's wrapper, its world size) and the case's facts (JSON) as metadata.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback

sys.path.insert(0, os.getcwd())
from robustft import (  # noqa: E402
    EMAReferenceCallback,
    LPFTCallback,
    ShrinkPerturbCallback,
    SparseUpdateCallback,
    WiseFTCallback,
)
from tests.distributed.deepspeed_run import ds_config  # noqa: E402
from tests.distributed.harness import allow_deepspeed_on_cpu, allow_fsdp_on_cpu, finish, fsdp_args  # noqa: E402
from tests.tiny import lm_dataset, tiny_llama, token_dataset, training_args  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 4


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # known before the Trainer initialises the process group


class Record(TrainerCallback):
    """The trainable weights after every optimizer step (before any later callback event of the next)."""

    def __init__(self):
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                         if p.requires_grad}


def _fisher_share():
    """The Fisher examples of this rank: all 8 on one process, every other one on each of 2 ranks."""
    ids = torch.tensor(lm_dataset(8, seed=3)["input_ids"])[rank() :: world()]
    return [{"input_ids": ids, "labels": ids}]


def nll(pred):
    """Mean negative log-likelihood and accuracy of a classifier's logits: order-sensitive, continuous."""
    logits, labels = torch.as_tensor(np.asarray(pred.predictions)), torch.as_tensor(pred.label_ids)
    logp = torch.log_softmax(logits.double(), -1)
    return {"nll": float(-logp[torch.arange(len(labels)), labels].mean()),
            "accuracy": float((logits.argmax(-1) == labels).double().mean())}


def lm_case(name: str, callbacks: list, out: Path, **overrides) -> tuple[Trainer, Record]:
    record = Record()
    args = training_args(out / name, max_steps=STEPS, learning_rate=0.05,
                         per_device_train_batch_size=GLOBAL_BATCH // world(), **overrides)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(GLOBAL_BATCH),
                      callbacks=[*callbacks, record])
    return trainer, record


def save(trainer, out: Path, name: str, start, record: Record | None, extra=None, facts=None) -> None:
    tensors = {f"start.{n}": t for n, t in start.items()}
    tensors.update({f"end.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()
                    if p.requires_grad})
    for step, weights in (record.steps.items() if record is not None else ()):
        tensors.update({f"step{step}.{n}": t for n, t in weights.items()})
    tensors.update(extra or {})
    (out / name).mkdir(parents=True, exist_ok=True)
    meta = {"wrapper": type(trainer.model_wrapped).__name__, "world_size": str(trainer.args.world_size),
            "facts": json.dumps(facts or {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name / f"rank{rank()}.safetensors"),
              metadata=meta)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_plain(out: Path) -> None:
    trainer, record = lm_case("plain", [], out)
    start = trainable(trainer.model)
    trainer.train()
    save(trainer, out, "plain", start, record)


def run_sparse(name: str, out: Path) -> None:
    fisher = dict(scores="fisher", fisher_data=_fisher_share(), fisher_examples=8)
    scores = fisher if name == "sparse_fisher" else dict(scores="magnitude")
    cb = SparseUpdateCallback(density=0.05, **scores)
    trainer, record = lm_case(name, [cb], out, weight_decay=0.1)  # decay would move frozen entries
    start = trainable(trainer.model)
    trainer.train()
    save(trainer, out, name, start, record, extra={f"mask.{n}": m for n, m in cb.masks.items()})


def run_lpft(out: Path) -> None:
    cb = LPFTCallback(probe_steps=2, head=r"^lm_head\.")
    trainer, record = lm_case("lpft", [cb], out)
    start = trainable(trainer.model)
    trainer.train()
    save(trainer, out, "lpft", start, record, facts={"boundary_step": cb.boundary_step})


def run_shrink(out: Path) -> None:
    cb = ShrinkPerturbCallback(shrink=0.8, sigma=0.02, every_n_steps=2, seed=7)
    trainer, record = lm_case("shrink", [cb], out)
    start = trainable(trainer.model)
    trainer.train()
    save(trainer, out, "shrink", start, record)


def run_dawin(out: Path) -> None:
    sets = {"id": token_dataset(13, seed=5), "shifted": token_dataset(11, seed=6)}  # odd: padded gathers
    cb = WiseFTCallback(alpha=1.0, eval_datasets=sets, id_dataset="id", metric="nll", greater_is_better=False,
                        dynamic="dawin", n_components=2, progress=False)
    # average_tokens_across_devices=False: transformers 5 multiplies the loss by the number of ranks for a
    # model whose forward takes **kwargs (BERT) though its loss is a per-rank mean: twice the gradient and
    # twice the eval loss on 2 ranks (a Trainer matter, not the callbacks')
    args = training_args(out / "dawin", max_steps=STEPS, per_device_train_batch_size=16 // world(),
                         per_device_eval_batch_size=3, average_tokens_across_devices=False)
    torch.manual_seed(0)  # no dropout: its draws differ between one process and two ranks
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    start = trainable(model)
    # the global batch is the whole training set: the ranks' samplers shuffle otherwise than one process's
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(16), compute_metrics=nll,
                      callbacks=[cb])
    trainer.train()
    facts = {"dawin": cb.dawin.as_dict()}
    end = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_loss = WiseFTCallback(alpha=1.0, eval_datasets=sets, id_dataset="id", metric="loss",
                             greater_is_better=False, dynamic="dawin", progress=False)
    again = Trainer(model=model, args=args, train_dataset=token_dataset(16), callbacks=[by_loss])
    try:  # refused at train begin on several ranks (the Trainer's eval loss is not exact there)
        again.train()
        facts["by_loss"] = by_loss.dawin.results
    except ValueError as err:
        facts["by_loss"] = {"refused": str(err), "global_step": again.state.global_step}
    with torch.no_grad():  # the first run's end, as trained
        for n, p in model.named_parameters():
            p.copy_(end[n])
    save(trainer, out, "dawin", start, None, facts=facts)


#: launched alone (each patches accelerate for its mode): the EMA reference refused on sharded policies
SHARDED_CASES = ("ema_reference_fsdp", "ema_reference_zero3")
SHARDING = {"fsdp": fsdp_args, "zero3": lambda: dict(deepspeed=ds_config(3), use_cpu=False)}

WORDS = "<pad> <unk> <s> </s> the cat dog sat ran on mat rug fast slow red blue is was a".split()
PAIRS = [("the cat", "sat on the mat", "ran fast"), ("the dog", "ran fast", "sat on a rug"),
         ("a cat", "is red", "was blue"), ("a dog", "was slow", "is fast"), ("the mat", "is blue", "ran"),
         ("the rug", "was red", "sat slow"), ("a red cat", "sat", "ran on the rug"),
         ("a blue dog", "ran slow", "is a mat")]


def run_ema_reference(out: Path, sharding: str | None = None) -> None:
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config)
    data = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [" " + c for _, c, _ in PAIRS],
                              "rejected": [" " + r for _, _, r in PAIRS]})
    # SGD: Adam's normalised steps turn the float noise of other batch splits into 1e-4 differences
    cb, record = EMAReferenceCallback(decay=0.6), Record()
    args = trl.DPOConfig(output_dir=str(out / "ema_reference"), per_device_train_batch_size=4 // world(),
                         max_steps=STEPS, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                         logging_steps=1,
                         save_strategy="no", report_to=[], seed=0, bf16=False, beta=0.5, disable_tqdm=True,
                         **{"use_cpu": True, **SHARDING.get(sharding, dict)()})
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[cb, record])
    start = trainable(trainer.model)
    if sharding is not None:  # refused at train begin, before any step; the policy must really be sharded
        try:
            trainer.train()
            facts = {"refused": None}
        except NotImplementedError as err:
            facts = {"refused": str(err)}
        params = list(trainer.model.parameters())  # the Trainer shards in train(), before the callbacks
        facts.update(global_step=trainer.state.global_step, wrapper=type(trainer.model_wrapped).__name__,
                     dtensors=all(hasattr(p, "placements") for p in params),
                     zero3_partitioned=all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params))
        (out / f"ema_reference_{sharding}").mkdir(parents=True, exist_ok=True)
        (out / f"ema_reference_{sharding}" / f"rank{rank()}.json").write_text(json.dumps(facts))
        return
    trainer.train()
    ref = {f"ref.{n}": p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    save(trainer, out, "ema_reference", start, record, extra=ref)


def main(out: str) -> None:
    out = Path(out)
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    cases = {"plain": run_plain, "sparse_fisher": lambda o: run_sparse("sparse_fisher", o),
             "sparse_magnitude": lambda o: run_sparse("sparse_magnitude", o), "lpft": run_lpft,
             "shrink": run_shrink, "dawin": run_dawin, "ema_reference": run_ema_reference,
             "ema_reference_fsdp": lambda o: run_ema_reference(o, "fsdp"),
             "ema_reference_zero3": lambda o: run_ema_reference(o, "zero3")}
    if only is not None and "ema_reference_fsdp" in only:
        allow_fsdp_on_cpu()
    if only is not None and "ema_reference_zero3" in only:
        allow_deepspeed_on_cpu()
    for name, run in cases.items():
        if (only is None and name not in SHARDED_CASES) or (only is not None and name in only):
            run(out)
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
