"""Alignment on SmolLM2-135M-Instruct, offline on CPU: WARM reward models and DPO with/without the EMA anchor.

    python benchmarks/alignment.py --setting fast     # a few minutes quiet; writes docs/benchmarks.md
    python benchmarks/alignment.py                    # --setting full: more pairs and steps
    python benchmarks/alignment.py --setting fast --rm-steps 4 --dpo-steps 4    # a smoke run under load

Data: ``robustft.demos.llm.make_preference_task`` (WordNet glosses; chosen = the word's definition, rejected
= another word's). In ``train`` and ``id`` the chosen answer is always the longer one; in ``cue_reversed``
(same topics) and ``shifted`` (artifacts instead of animals and plants) it is always the shorter one, so a
model that learned the length cue instead of the definitions drops below 50 % there.

(a) WARM (``examples/warm_reward_models.py``): N full fine-tuned reward models from one init (TRL
    ``RewardTrainer``, seeds and learning rates differ), their weight average by ``robustft merge``
    (``linear``) and the prediction ensemble; pairwise accuracy per split, scoring time, parameters held.
(b) DPO (TRL ``DPOTrainer``, LoRA on every linear layer) from the instruct model, without and with
    ``EMAReferenceCallback`` (the reference follows the EMA of the policy's adapter). Scores on each split,
    both against the start model π_0 (the instruct model, adapters off): the mean per-token KL(π‖π_0)
    over the answer tokens of the pairs (teacher-forced; chosen and rejected answers), and the implicit-
    reward accuracy: log π(y_c)/π_0(y_c) > log π(y_r)/π_0(y_r).

The section between the ``alignment-benchmark`` markers in ``docs/benchmarks.md`` is replaced with the result
and the command (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import warm_reward_models as warm  # noqa: E402

from benchmarks.llm import publish  # noqa: E402
from robustft.demos import llm as demo_llm  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402

START, END = "<!-- alignment-benchmark:start -->", "<!-- alignment-benchmark:end -->"
EVAL_SPLITS = ("id", "cue_reversed", "shifted")


@dataclass(frozen=True)
class AlignmentConfig:
    """Sizes and hyperparameters of one setting."""

    n_train: int = 32
    n_eval: int = 16
    batch_size: int = 4
    rm_n: int = 3
    rm_steps: int = 8
    rm_learning_rates: tuple[float, ...] = (2e-5, 4e-5, 6e-5)
    dpo_steps: int = 8
    dpo_learning_rate: float = 1e-3
    dpo_beta: float = 0.1
    ema_decay: float = 0.9
    rank: int = 8
    bf16: bool = True  # autocast on CPU (float32 master weights), as the LLM demo
    seed: int = 0


FAST = AlignmentConfig()
FULL = AlignmentConfig(n_train=256, n_eval=96, batch_size=8, rm_steps=64, dpo_steps=64, ema_decay=0.95)


# -- (b) DPO with and without the EMA anchor ------------------------------------------------------------
@torch.no_grad()
def answer_stats(model, tokenizer, rows, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per pair: log π(answer) and log π_0(answer) of the chosen and rejected answers (π_0: the model with
    its adapters disabled) and the summed per-token KL(π‖π_0) and token count over both answers."""
    model.eval()
    seqs, starts = [], []
    for r in rows:
        prompt = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        for k in ("chosen", "rejected"):
            ids = warm.token_ids(tokenizer, r["prompt"], r[k])
            assert ids[: len(prompt)] == list(prompt), "the answer must follow the prompt's tokens"
            seqs.append(ids)
            starts.append(len(prompt))
    device = next(model.parameters()).device
    logp, logp0, kl, count = [], [], [], []
    for i in range(0, len(seqs), batch_size):
        chunk, first = seqs[i:i + batch_size], starts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        answer = torch.zeros_like(mask, dtype=torch.bool)
        for j, (s, f) in enumerate(zip(chunk, first)):
            answer[j, f:len(s)] = True
        answer = answer[:, 1:]  # the positions whose next token is an answer token
        target = ids[:, 1:].unsqueeze(-1)
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        with model.disable_adapter():
            lp0 = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        logp.append((lp.gather(-1, target).squeeze(-1) * answer).sum(1))
        logp0.append((lp0.gather(-1, target).squeeze(-1) * answer).sum(1))
        kl.append(((lp.exp() * (lp - lp0)).sum(-1) * answer).sum(1))
        count.append(answer.sum(1))
    return {"logp": torch.cat(logp).view(-1, 2).cpu(), "logp0": torch.cat(logp0).view(-1, 2).cpu(),
            "kl": torch.cat(kl).cpu(), "tokens": torch.cat(count).cpu()}


def dpo_scores(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(π‖π_0) and the implicit-reward accuracy against π_0."""
    reward = stats["logp"] - stats["logp0"]
    return {"kl": (stats["kl"].sum() / stats["tokens"].sum()).item(),
            "accuracy": (reward[:, 0] > reward[:, 1]).float().mean().item()}


def dpo_run(model_dir: Path, data: dict, out: Path, cfg: AlignmentConfig, anchor: bool) -> dict:
    """DPO with LoRA from the instruct model; ``anchor``: the reference follows the policy's EMA."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from robustft import EMAReferenceCallback

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(out), max_steps=cfg.dpo_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.dpo_learning_rate, lr_scheduler_type="constant", warmup_steps=0, beta=cfg.dpo_beta,
        seed=cfg.seed, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=cfg.bf16,
        activation_checkpointing=False, logging_steps=max(1, cfg.dpo_steps // 4), disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [EMAReferenceCallback(cfg.ema_decay)] if anchor else []
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list(data["train"]), processing_class=tokenizer,
        peft_config=demo_llm.lora_config(demo_llm.LLMDemoConfig(rank=cfg.rank)), callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scores = {s: dpo_scores(answer_stats(trainer.model, tokenizer, data[s])) for s in EVAL_SPLITS}
    return {"scores": scores, "train_seconds": seconds}


def dpo_table(runs: dict[str, dict]) -> str:
    header = ["DPO run", *(f"{s} acc" for s in EVAL_SPLITS), *(f"{s} KL" for s in EVAL_SPLITS), "train s"]
    return format_table(header, [
        [name, *(f"{r['scores'][s]['accuracy']:.3f}" for s in EVAL_SPLITS),
         *(f"{r['scores'][s]['kl']:.4f}" for s in EVAL_SPLITS), f"{r['train_seconds']:.0f}"]
        for name, r in runs.items()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=["full", "fast"], default="full")
    p.add_argument("--rm-steps", type=int, help="override the setting's steps per reward model")
    p.add_argument("--dpo-steps", type=int, help="override the setting's DPO steps")
    p.add_argument("--skip-warm", action="store_true")
    p.add_argument("--skip-dpo", action="store_true")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_alignment_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()
    cfg = FULL if args.setting == "full" else FAST
    cfg = replace(cfg, rm_steps=args.rm_steps or cfg.rm_steps, dpo_steps=args.dpo_steps or cfg.dpo_steps)
    command = "python benchmarks/alignment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    model_dir = demo_llm.model_path()
    data = demo_llm.make_preference_task(demo_llm.wordnet_dir(), cfg.n_train, cfg.n_eval, cfg.seed)
    out = Path(args.out)
    load0 = os.getloadavg()[0]
    parts = [
        "## Alignment: WARM reward models and DPO with the EMA anchor (SmolLM2-135M-Instruct)",
        "",
        f"Command: `{command.strip()}` (written by the script; setting `{args.setting}`: {cfg.n_train} "
        f"preference pairs for training, {cfg.n_eval} per evaluation set, batch {cfg.batch_size} pairs, "
        f"bf16 autocast {'on' if cfg.bf16 else 'off'}, seed {cfg.seed}). Load average at start {load0:.1f} "
        f"on {os.cpu_count()} cores (above ~1 per core, other jobs were running: times are indicative).",
        "",
        "Data (`robustft.demos.llm.make_preference_task`, WordNet 3.0 glosses): the prompt asks for a word's "
        "definition, chosen is its definition, rejected another word's. `id`: animals and plants, chosen "
        "always the longer answer, as in training; `cue_reversed`: same topics, chosen always the shorter; "
        "`shifted`: artifacts, chosen always the shorter. Length alone scores 100 % / 0 % / 0 %.",
    ]
    t0 = time.time()
    if not args.skip_warm:
        result = warm.run_warm(model_dir, data, out / "warm", n=cfg.rm_n,
                               learning_rates=cfg.rm_learning_rates, steps=cfg.rm_steps,
                               batch_size=cfg.batch_size, bf16=cfg.bf16, seed=cfg.seed)
        lrs = ", ".join(f"{x:g}" for x in result["learning_rates"])
        secs = ", ".join(f"{x:.0f}" for x in result["train_seconds"])
        parts += [
            "",
            f"### (a) WARM: {cfg.rm_n} reward models, their prediction ensemble and their weight average",
            "",
            "Each RM: `AutoModelForSequenceClassification(num_labels=1)` from one saved init, full "
            f"fine-tuning with TRL `RewardTrainer`, {cfg.rm_steps} steps, learning rates {lrs}, seeds "
            f"{cfg.seed}..{cfg.seed + cfg.rm_n - 1} (training {secs} s). Weight average: `robustft merge`, "
            f"recipe `linear` ({result['merge_seconds']:.1f} s). Pairwise accuracy (reward of chosen > "
            "rejected); scoring s: wall time to score all three sets; parameters held: what inference keeps "
            "in memory.",
            "",
            warm.table(result["rows"], result["splits"]),
        ]
    if not args.skip_dpo:
        runs = {}
        for name, anchor in (("DPO (frozen reference)", False),
                             (f"DPO + EMA anchor (decay {cfg.ema_decay:g})", True)):
            runs[name] = dpo_run(model_dir, data, out / ("dpo_ema" if anchor else "dpo"), cfg, anchor)
            print(name, runs[name], flush=True)
        parts += [
            "",
            "### (b) DPO with and without the EMA anchor",
            "",
            f"TRL `DPOTrainer` from the instruct model, LoRA r={cfg.rank} on every linear layer, "
            f"{cfg.dpo_steps} steps, lr {cfg.dpo_learning_rate:g}, beta {cfg.dpo_beta:g}; the anchored run "
            f"adds `EMAReferenceCallback({cfg.ema_decay:g})`. acc: implicit-reward accuracy against the "
            "start model π_0, log π(y_c)/π_0(y_c) > log π(y_r)/π_0(y_r); KL: mean per-token KL(π‖π_0) over "
            "the answer tokens of both answers (teacher-forced); π_0 is the instruct model (adapters off).",
            "",
            dpo_table(runs),
        ]
    parts += ["", f"Total {time.time() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f}. "
              f"Config: `{asdict(cfg)}`."]
    text = "\n".join(parts)
    return publish(text, args.no_write, START, END)


if __name__ == "__main__":
    sys.exit(main())
