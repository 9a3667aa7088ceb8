"""estimate_fisher against the closed-form per-example gradient of a softmax classifier, and a Fisher-weighted
merge of tiny Llamas through a recipe against the formula applied in memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from robustft.core.statistics import estimate_fisher, save_fisher
from robustft.merge import merge_checkpoints, parse_recipe
from robustft.ops import merge as M
from tests.merge.tiny_models import build_family, load_all


class Softmax(nn.Module):
    def __init__(self, d=5, c=3):
        super().__init__()
        self.linear = nn.Linear(d, c, bias=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.linear(self.drop(x)), labels)}


def test_fisher_matches_closed_form_softmax_gradient():
    torch.manual_seed(0)
    model = Softmax()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    loader = [{"x": x[:5], "labels": y[:5]}, {"x": x[5:], "labels": y[5:]}]
    model.train()
    model.linear.weight.grad = torch.full_like(model.linear.weight, 7.0)
    fisher = estimate_fisher(model, loader)
    # d CE / d W = (softmax(W x) - e_y) x^T for each example; F = mean of squares
    W = model.linear.weight.detach()
    ref = torch.zeros_like(W)
    for n in range(12):
        p = torch.softmax(W @ x[n], dim=0)
        p[y[n]] -= 1
        ref += torch.outer(p, x[n]) ** 2
    torch.testing.assert_close(fisher["linear.weight"], ref / 12)
    assert model.training, "train mode restored"
    assert bool((model.linear.weight.grad == 7.0).all()), ".grad untouched"
    limited = estimate_fisher(model, loader, max_examples=3)
    ref3 = torch.zeros_like(W)
    for n in range(3):
        p = torch.softmax(W @ x[n], dim=0)
        p[y[n]] -= 1
        ref3 += torch.outer(p, x[n]) ** 2
    torch.testing.assert_close(limited["linear.weight"], ref3 / 3)


def test_fisher_merge_recipe_with_estimated_fishers(tmp_path):
    base_dir, dirs = build_family(tmp_path, n=2, tokenizer=False)
    fisher_files = []
    for i, d in enumerate(dirs):
        model = LlamaForCausalLM.from_pretrained(d)
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=g)
        fisher = estimate_fisher(model, [{"input_ids": ids, "labels": ids}])
        fisher_files.append(save_fisher(fisher, tmp_path / f"fisher{i}.safetensors"))
    with pytest.raises(FileExistsError):
        save_fisher(fisher, fisher_files[-1])
    recipe = {
        "merge_method": "fisher",
        "models": [
            {"model": str(d), "parameters": {"fisher": str(f), "weight": w}}
            for d, f, w in zip(dirs, fisher_files, [1.0, 2.0], strict=True)
        ],
        "parameters": {"eps": 1e-6},
    }
    merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    got = load_all(tmp_path / "out")
    fts = [load_all(d) for d in dirs]
    fishers = [load_file(str(f)) for f in fisher_files]
    for name in fts[0]:
        ref = M.fisher_merge(
            [ft[name] for ft in fts], [f[name] for f in fishers], eps=1e-6, weights=[1.0, 2.0]
        )
        torch.testing.assert_close(got[name], ref, msg=name)
    LlamaForCausalLM.from_pretrained(tmp_path / "out")


def test_fisher_file_missing_tensor_is_named(tmp_path):
    base_dir, dirs = build_family(tmp_path, n=2, tokenizer=False)
    fisher = {k: torch.ones_like(v) for k, v in load_all(dirs[0]).items()}
    fisher.pop("model.norm.weight")
    path = save_fisher(fisher, tmp_path / "f.safetensors")
    recipe = {
        "merge_method": "fisher",
        "models": [{"model": str(d), "parameters": {"fisher": str(path)}} for d in dirs],
    }
    with pytest.raises(ValueError, match="has no tensor 'model.norm.weight'"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
