"""WARM (Ramé et al., 2024): N reward models from one init, averaged in weight space with robustft's merge.

    python examples/warm_reward_models.py                 # --tiny: random-init Llama + synthetic pairs, CPU
    python examples/warm_reward_models.py --model ~/.cache/robustft/smollm2-135m-instruct   # WordNet pairs

1. One shared init: ``AutoModelForSequenceClassification(num_labels=1)`` on the base LM (the reward head
   drawn once, seeded) is saved, and every reward model starts from that folder.
2. N reward models are trained from it with TRL's ``RewardTrainer`` (Bradley-Terry loss on
   (prompt, chosen, rejected)), each with its own seed (data order) and learning rate.
3. ``robustft merge`` (recipe ``linear``: the plain mean of the N weights) writes the weight average, one
   model (WARM); the prediction ensemble (mean of the N rewards) is the baseline it should match at 1/N of
   the cost.
4. Every single RM, the ensemble and the weight average are scored by pairwise accuracy (reward of chosen
   > reward of rejected) on each evaluation set, with their cost: scoring time and parameters held.

Data: with ``--model`` the WordNet preference pairs of ``robustft.demos.llm.make_preference_task`` (needs
``wordnet-base``): ``id`` with a length cue that agrees with the preference as in training, ``cue_reversed``
and ``shifted`` (another topic) where it is reversed, so a reward model that learned the cue (reward
hacking) drops below 50 %. In tiny mode (no ``--model``) a 2-layer random-init Llama, a word-level
tokenizer and synthetic pairs with the same kind of cue are written to ``<output-dir>/tiny``.
``benchmarks/alignment.py`` runs this on SmolLM2-135M-Instruct and writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_WORDS = ("<pad> <unk> <s> </s> define the word what is a an of and with small large red blue green bird "
              "fish tree tool box cup stone river it has very long short legs wings leaves handle lid no "
              "yes not").split()


# -- 1-2: one init, N reward models ------------------------------------------------------------------------
def make_init(base: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """The shared init: the base LM with a fresh scalar reward head (seeded), saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-padding token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_reward_model(init: str | os.PathLike, train, out: str | os.PathLike, *, seed: int,
                       learning_rate: float, steps: int, batch_size: int, bf16: bool = False) -> Path:
    """One reward model: TRL's ``RewardTrainer`` from the shared init; saved (safetensors) in ``out``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        seed=seed, data_seed=seed, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        bf16=bf16, activation_checkpointing=False, logging_steps=max(1, steps // 4), disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(init, dtype=torch.float32), args=args,
        train_dataset=train, processing_class=AutoTokenizer.from_pretrained(init),
    )
    trainer.train()
    trainer.save_model(str(out))
    return Path(out)


# -- 3: the weight average -----------------------------------------------------------------------------
def weight_average(reward_models: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """WARM: the mean of the reward models' weights, by ``robustft merge`` (recipe ``linear``), streamed."""
    from robustft.merge import merge_checkpoints, parse_recipe

    recipe = parse_recipe({"merge_method": "linear", "models": [str(p) for p in reward_models],
                           "dtype": "float32"}, source="WARM recipe")
    merge_checkpoints(recipe, out, overwrite=True, progress=False)
    return Path(out)


# -- 4: scores and costs --------------------------------------------------------------------------------
def token_ids(tokenizer, prompt, answer) -> list[int]:
    """The ids RewardTrainer scores for prompt + answer: the chat template for conversational rows, else
    the text with an end-of-sequence token (trl 1.16 ``RewardTrainer._prepare_dataset``)."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)
                    ["input_ids"])
    text = prompt + answer
    return tokenizer(text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token)["input_ids"]


@torch.no_grad()
def pair_rewards(model, tokenizer, rows: Sequence[dict], batch_size: int = 16) -> torch.Tensor:
    """Rewards (n, 2) of the chosen and rejected answers of ``rows``, right-padded batches."""
    model.eval()
    seqs = [token_ids(tokenizer, r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(out).view(-1, 2)


def accuracy(rewards: torch.Tensor) -> float:
    """Pairwise accuracy: the fraction of pairs whose chosen answer gets the higher reward."""
    return (rewards[:, 0] > rewards[:, 1]).float().mean().item()


def compare(reward_models: Sequence[str | os.PathLike], averaged: str | os.PathLike,
            evals: dict[str, Sequence[dict]]) -> dict[str, dict]:
    """Row -> {split: accuracy, "seconds": scoring time, "parameters": parameters held} for every single
    RM, the prediction ensemble (mean reward of the N) and the weight average."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def score(path):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        start = time.perf_counter()
        rewards = {s: pair_rewards(model, tokenizer, rows) for s, rows in evals.items()}
        return rewards, time.perf_counter() - start, sum(p.numel() for p in model.parameters())

    rows, singles = {}, []
    for i, path in enumerate(reward_models):
        rewards, seconds, n = score(path)
        singles.append(rewards)
        rows[f"RM {i}"] = {**{s: accuracy(r) for s, r in rewards.items()}, "seconds": seconds,
                           "parameters": n}
    rows["ensemble (mean reward)"] = {
        **{s: accuracy(torch.stack([r[s] for r in singles]).mean(0)) for s in evals},
        "seconds": sum(rows[f"RM {i}"]["seconds"] for i in range(len(singles))),
        "parameters": sum(rows[f"RM {i}"]["parameters"] for i in range(len(singles))),
    }
    rewards, seconds, n = score(averaged)
    rows["WARM (weight average)"] = {**{s: accuracy(r) for s, r in rewards.items()}, "seconds": seconds,
                                     "parameters": n}
    return rows


def table(rows: dict[str, dict], splits: Sequence[str]) -> str:
    """The comparison as a Markdown table (accuracy per split, scoring time, parameters held)."""
    from robustft.demos.console import format_table

    return format_table(
        ["reward model", *(f"{s} acc" for s in splits), "scoring s", "parameters held"],
        [[name, *(f"{r[s]:.3f}" for s in splits), f"{r['seconds']:.1f}", f"{r['parameters'] / 1e6:.2f}M"]
         for name, r in rows.items()],
    )


def run_warm(base: str | os.PathLike, data: dict[str, list[dict]], out: str | os.PathLike, *, n: int = 3,
             learning_rates: Sequence[float] = (1e-5,), steps: int = 20, batch_size: int = 8,
             bf16: bool = False, seed: int = 0, verbose: bool = True) -> dict:
    """The whole WARM pipeline on ``data`` (``train`` + evaluation splits); returns rows and timings."""
    out = Path(out)
    t0 = time.perf_counter()
    init = make_init(base, out / "init", seed)
    from datasets import Dataset

    train = Dataset.from_list(data["train"])
    evals = {k: v for k, v in data.items() if k != "train"}
    paths, train_seconds = [], []
    for i in range(n):
        lr = learning_rates[i % len(learning_rates)]
        start = time.perf_counter()
        paths.append(train_reward_model(init, train, out / f"rm{i}", seed=seed + i, learning_rate=lr,
                                        steps=steps, batch_size=batch_size, bf16=bf16))
        train_seconds.append(time.perf_counter() - start)
        if verbose:
            print(f"reward model {i}: seed {seed + i}, lr {lr:g}, {steps} steps ({train_seconds[-1]:.0f} s)",
                  flush=True)
    start = time.perf_counter()
    averaged = weight_average(paths, out / "warm")
    merge_seconds = time.perf_counter() - start
    rows = compare(paths, averaged, evals)
    result = {"rows": rows, "splits": list(evals), "train_seconds": train_seconds,
              "merge_seconds": merge_seconds, "total_seconds": time.perf_counter() - t0, "n": n,
              "learning_rates": [learning_rates[i % len(learning_rates)] for i in range(n)], "steps": steps,
              "batch_size": batch_size, "sizes": {k: len(v) for k, v in data.items()}}
    (out / "warm.json").write_text(json.dumps(result, indent=2))
    if verbose:
        print(table(rows, result["splits"]))
        print(f"merge {merge_seconds:.1f} s; results in {out / 'warm.json'}")
    return result


# -- tiny mode ------------------------------------------------------------------------------------------
def tiny_setup(folder: Path, n_train: int = 48, n_eval: int = 24, seed: int = 0) -> tuple[Path, dict]:
    """A random-init 2-layer Llama + word-level tokenizer saved in ``folder``, and synthetic pairs: chosen
    says "yes ... it has ...", rejected "no ..."; the chosen answer is longer in train/id, shorter in
    ``shifted`` (other nouns) - the same kind of length cue as the WordNet pairs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = random.Random(seed)

    def rows(nouns, n, chosen_longer):
        out = []
        for _ in range(n):
            noun, adj = rng.choice(nouns), rng.choice(["small", "large", "red", "blue", "green"])
            part = rng.choice(["legs", "wings", "leaves", "handle", "lid"])
            long_, short = f" it has very long {part}", ""
            out.append({"prompt": f"define the word {noun}",
                        "chosen": f" yes a {adj} {noun}" + (long_ if chosen_longer else short),
                        "rejected": f" no not a {adj} {noun}" + (short if chosen_longer else long_)})
        return out

    living = ["bird", "fish", "tree"]
    data = {"train": rows(living, n_train, True), "id": rows(living, n_eval, True),
            "shifted": rows(["tool", "box", "cup", "stone", "river"], n_eval, False)}
    return folder, data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base causal LM folder (default: tiny mode)")
    p.add_argument("--wordnet", help="WordNet 3.0 dict folder (default: the Debian wordnet-base one)")
    p.add_argument("--output-dir", default="runs/warm")
    p.add_argument("--n", type=int, default=3, help="number of reward models")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per reward model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rates", type=float, nargs="+", default=None,
                   help="one per reward model, cycled (default: tiny 5e-3; a real model 1e-5 2e-5 3e-5)")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with AVX512-BF16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()
    out = Path(args.output_dir)
    if args.model is None:
        base, data = tiny_setup(out / "tiny", seed=args.seed)
        lrs, steps = args.learning_rates or [5e-3, 1e-2, 2e-2], args.steps or 12
    else:
        from robustft.demos import llm as demo_llm

        base = args.model
        data = demo_llm.make_preference_task(demo_llm.wordnet_dir(args.wordnet), args.n_train, args.n_eval,
                                             args.seed)
        lrs, steps = args.learning_rates or [1e-5, 2e-5, 3e-5], args.steps or 30
    run_warm(base, data, out, n=args.n, learning_rates=lrs, steps=steps, batch_size=args.batch_size,
             bf16=args.bf16, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
