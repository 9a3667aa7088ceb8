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


# --- per-example gradients batched with torch.func (issue 28 item 3) ---------------------------------


def _brute_force_fisher(model, examples, names):
    """mean over examples of the squared gradient, each example alone through autograd (eval mode)."""
    model.eval()
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for ex in examples:
        grads = torch.autograd.grad(model(**ex).loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                ref[n] += g.float() ** 2
    return {n: r / len(examples) for n, r in ref.items()}


def _assert_fisher_close(got, ref, rtol=1e-5):
    """Equal to float rounding: elementwise rtol, plus an atol at rtol of the largest entry (gradients that
    are zero in exact arithmetic, such as attention key biases, are rounding noise on both sides)."""
    assert got.keys() == ref.keys()
    scale = max(float(r.abs().max()) for r in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=rtol * scale, msg=name)


def _padded_batches(vocab, lengths, n_labels, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    labels = torch.randint(0, n_labels, (len(lengths),), generator=g)
    return [{"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]},
            {"input_ids": ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}]


def _single_examples(batches):
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg)


def _tiny_llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32, num_labels=3,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_llama_classifier], ids=["bert", "llama"])
def test_vmap_fisher_equals_loop_and_brute_force_with_padding(build):
    model = build()
    model.train()  # dropout on: the estimate runs in eval mode on both paths, and train mode comes back
    batches = _padded_batches(50, [5, 3, 5, 7, 2, 7, 7, 4], 3, pad=0)
    vmapped = estimate_fisher(model, batches, per_example="vmap")
    looped = estimate_fisher(model, batches, per_example="loop")
    assert model.training
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = _brute_force_fisher(model, _single_examples(batches), names)
    _assert_fisher_close(looped, ref)
    _assert_fisher_close(vmapped, ref)
    cut = estimate_fisher(model, batches, max_examples=6, per_example="vmap")
    _assert_fisher_close(cut, _brute_force_fisher(model, _single_examples(batches)[:6], names))


def test_vmap_fisher_of_a_peft_lora_model_covers_only_trainable_parameters():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(_tiny_bert(), config)
    for p in model.parameters():  # LoRA B starts at zero: give it values so every gradient is non-trivial
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    batches = _padded_batches(50, [5, 3, 6, 2, 6, 6], 3, pad=0, seed=1)
    vmapped = estimate_fisher(model, batches, per_example="vmap")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(vmapped) == sorted(names) and any("lora_A" in n for n in names)
    assert not any("base_layer" in n for n in vmapped)
    ref = _brute_force_fisher(model, _single_examples(batches), names)
    _assert_fisher_close(vmapped, ref)
    _assert_fisher_close(estimate_fisher(model, batches, per_example="loop"), ref)


class Branchy(nn.Module):
    """A model with data-dependent control flow, which vmap refuses and the loop runs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x, labels):
        out = self.linear(x)
        if out.sum() > 0:
            out = out * 2
        return {"loss": nn.functional.cross_entropy(out, labels)}


def test_auto_falls_back_to_the_loop_where_vmap_refuses_and_vmap_says_so(monkeypatch):
    from robustft.core import statistics

    monkeypatch.setattr(statistics, "AUTO_VMAP_ON_CPU", True)  # "auto" as on an accelerator
    torch.manual_seed(0)
    model = Branchy()
    loader = [{"x": torch.randn(6, 4), "labels": torch.randint(0, 2, (6,))}]
    auto = estimate_fisher(model, loader)
    ref = _brute_force_fisher_plain(model, loader[0])
    _assert_fisher_close(auto, ref)
    with pytest.raises(ValueError, match="per_example='vmap'"):
        estimate_fisher(model, loader, per_example="vmap")
    with pytest.raises(ValueError, match="per_example must be one of"):
        estimate_fisher(model, loader, per_example="batched")


def _brute_force_fisher_plain(model, batch):
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(batch["labels"])):
        loss = model(**{k: v[i : i + 1] for k, v in batch.items()})["loss"]
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            ref[n] += g**2
    return {n: r / len(batch["labels"]) for n, r in ref.items()}


def test_vmap_fisher_with_a_custom_loss_fn_equals_the_loop():
    model = _tiny_bert()
    batches = _padded_batches(50, [4, 4, 6, 3, 6, 5], 3, pad=0, seed=2)

    def margin_loss(m, example):  # any loss of (model, example), here a logit margin
        logits = m(input_ids=example["input_ids"], attention_mask=example["attention_mask"]).logits
        return (logits[:, 0] - logits[:, 1]).pow(2).mean()

    _assert_fisher_close(estimate_fisher(model, batches, loss_fn=margin_loss, per_example="vmap"),
                         estimate_fisher(model, batches, loss_fn=margin_loss, per_example="loop"))
