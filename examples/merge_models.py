"""Merge fine-tuned checkpoints with a YAML recipe: build a tiny Llama, fine-tune three copies on three
synthetic tasks, merge them with TIES (examples/merge_recipe.yaml) and compare losses. Offline, CPU, < 1 min.

    python examples/merge_models.py [--workdir DIR] [--method ties|task_arithmetic|dare_ties|...]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from robustft.merge import merge_checkpoints, parse_recipe

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 48, 16


def task_batch(stride: int, n: int, seed: int) -> torch.Tensor:
    """Sequences counting up by ``stride`` modulo VOCAB from a random start: each stride is a task."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


@torch.no_grad()
def loss_on(model, ids) -> float:
    return float(model(input_ids=ids, labels=ids).loss)


def fine_tune(model, stride: int, steps: int = 60) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = task_batch(stride, 32, seed=1000 * stride + step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where models/ and merged/ go (default: a temp dir)")
    parser.add_argument("--method", default=None, help="override the recipe's merge_method")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="robustft-merge-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    fine_tune(base, stride=1, steps=20)  # a shared "pre-training" so fine-tunes stay in one basin
    base.save_pretrained(work / "models" / "base", max_shard_size="100KB")  # sharded on purpose
    for stride in (1, 2, 3):
        model = LlamaForCausalLM.from_pretrained(work / "models" / "base")
        fine_tune(model, stride)
        model.save_pretrained(work / "models" / f"ft_stride{stride}", max_shard_size="100KB")

    recipe = yaml.safe_load((HERE / "merge_recipe.yaml").read_text())
    if args.method:
        recipe["merge_method"] = args.method
        recipe["overrides"] = [o for o in recipe["overrides"] if "merge_method" in o]
    for entry in recipe["models"]:  # recipe paths are relative to the working directory
        entry["model"] = str(work / entry["model"])
    recipe["base_model"] = str(work / recipe["base_model"])
    out = work / "merged"
    if out.exists():
        shutil.rmtree(out)
    result = merge_checkpoints(parse_recipe(recipe), out, progress=False)
    print(f"merged {result.tensors} tensors into {out} ({len(result.files)} output file(s))")
    print(f"same from the shell:  cd {work} && robustft merge {HERE / 'merge_recipe.yaml'} --out merged")

    evals = {s: task_batch(s, 64, seed=99) for s in (1, 2, 3)}
    rows = {"base": work / "models" / "base"}
    rows.update({f"ft_stride{s}": work / "models" / f"ft_stride{s}" for s in (1, 2, 3)})
    rows["merged"] = out
    table = {}
    print(f"{'model':<12}" + "".join(f"  task{s} loss" for s in evals))
    for name, path in rows.items():
        model = LlamaForCausalLM.from_pretrained(path).eval()
        table[name] = [loss_on(model, ids) for ids in evals.values()]
        print(f"{name:<12}" + "".join(f"  {v:10.3f}" for v in table[name]))
    return table


if __name__ == "__main__":
    main()
