"""SparseUpdateCallback on a real Trainer: frozen entries bit-identical with AdamW + weight decay, FISH masks
against a Fisher computed by a plain loop, mask files, resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from robustft import RandomPerturbationCallback, SparseUpdateCallback
from robustft.callbacks.sparse import load_mask, save_mask
from tests.callbacks.failing import (
    FAILURES,
    assert_nothing_attached,
    assert_trains_like_a_fresh_copy,
    disarm,
    fail_training,
)
from tests.tiny import stop_at, tiny_bert, token_dataset, training_args

ADAMW = dict(weight_decay=0.1, adam_beta1=0.9, max_grad_norm=1.0)  # decoupled decay + momentum + clipping


def _train(out, callbacks, resume=None, model=None, **args):
    trainer = Trainer(model=model or tiny_bert(), args=training_args(out, **{**ADAMW, **args}),
                      train_dataset=token_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ranked(scores):
    """(score, name, flat index) of every entry, largest first: a brute-force sort."""
    entries = [(float(v), n, i) for n, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist())]
    return sorted(entries, key=lambda e: -e[0])


def _fisher_loader():
    return DataLoader(token_dataset(n=16, seed=1).with_format("torch"), batch_size=4)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_frozen_entries_end_bit_identical_with_adamw_weight_decay(tmp_path, accumulation):
    start = _weights(tiny_bert())
    plain = _weights(_train(tmp_path / "plain", [], gradient_accumulation_steps=accumulation).model)
    cb = SparseUpdateCallback(density=0.1, scores="magnitude")
    end = _weights(_train(tmp_path / "sparse", [cb], gradient_accumulation_steps=accumulation).model)
    moved_plain = moved_kept = 0
    for name, m in cb.masks.items():
        # every frozen entry is bit-identical to the start (weight decay would have moved it: see `plain`)
        assert torch.equal(end[name][~m].view(torch.int32), start[name][~m].view(torch.int32)), name
        moved_plain += int((plain[name][~m] != start[name][~m]).sum())
        moved_kept += int((end[name][m] != start[name][m]).sum())
    assert moved_plain > 0.9 * sum(int((~m).sum()) for m in cb.masks.values())  # the test can fail
    assert moved_kept > 0  # the kept entries train
    total = sum(m.numel() for m in cb.masks.values())
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.1 * total)
    assert getattr(cb.trainer.optimizer.step, "robustft_owner", None) is None  # the step wrapper is removed


@pytest.mark.parametrize("order", ["perturbation_first", "sparse_first"])
def test_frozen_entries_stay_exact_beside_a_one_pass_perturbation(tmp_path, order):
    """The perturbation is undone before the step, so the values kept around it are the unperturbed ones."""
    start = _weights(tiny_bert())
    sparse, rwp = SparseUpdateCallback(density=0.1, scores="magnitude"), RandomPerturbationCallback(rho=0.05)
    end = _weights(_train(tmp_path, [rwp, sparse] if order == "perturbation_first" else [sparse, rwp]).model)
    for name, m in sparse.masks.items():
        assert torch.equal(end[name][~m].view(torch.int32), start[name][~m].view(torch.int32)), name


def test_magnitude_mask_is_the_top_k_of_the_start_weights(tmp_path):
    start = tiny_bert()
    scores = {n: p.detach().abs() for n, p in start.named_parameters()}
    entries = _ranked(scores)
    k = round(0.05 * len(entries))
    want = {(n, i) for _, n, i in entries[:k]}
    cb = SparseUpdateCallback(density=0.05, scores="magnitude")
    _train(tmp_path, [cb], max_steps=1)
    got = {(n, i) for n, m in cb.masks.items() for i in m.reshape(-1).nonzero().squeeze(1).tolist()}
    assert got == want


def test_fish_mask_is_the_top_k_of_a_plain_loop_fisher(tmp_path):
    model = tiny_bert()
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    examples = 0
    for batch in _fisher_loader():  # the empirical Fisher: per-example squared gradients, averaged
        for i in range(batch["input_ids"].shape[0]):
            model.zero_grad()
            model(input_ids=batch["input_ids"][i : i + 1], labels=batch["labels"][i : i + 1]).loss.backward()
            for n, p in model.named_parameters():
                fisher[n] += p.grad**2
            examples += 1
    assert examples == 16
    entries = _ranked({n: f / 16 for n, f in fisher.items()})
    k = round(0.02 * len(entries))
    cb = SparseUpdateCallback(density=0.02, fisher_data=_fisher_loader(), fisher_examples=16)
    _train(tmp_path, [cb], max_steps=1)
    got = {(n, i) for n, m in cb.masks.items() for i in m.reshape(-1).nonzero().squeeze(1).tolist()}
    want = {(n, i) for _, n, i in entries[:k]}
    # float sums in another order can swap entries whose Fisher ties to rounding at the k-th place
    kth = entries[k - 1][0]
    unsure = {(n, i) for v, n, i in entries if abs(v - kth) <= 1e-6 * max(kth, 1e-30)}
    assert got - unsure == want - unsure
    assert len(got) == k


def test_fisher_pass_leaves_the_training_run_unchanged(tmp_path):
    """Estimating the Fisher at train begin draws no training randomness: with the mask of a file, the same
    run gives the same weights."""
    path = tmp_path / "mask.safetensors"
    first = SparseUpdateCallback(density=0.1, fisher_data=_fisher_loader(), fisher_examples=8, save_mask=path)
    a = _weights(_train(tmp_path / "a", [first]).model)
    assert path.is_file()
    again = SparseUpdateCallback(mask_file=path)
    b = _weights(_train(tmp_path / "b", [again]).model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    loaded = load_mask(path)
    assert all(torch.equal(loaded[n], first.masks[n]) for n in first.masks)


def test_mask_file_that_does_not_match_is_a_named_error(tmp_path):
    params = dict(tiny_bert().named_parameters())
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()}
    name = "classifier.weight"
    save_mask({**masks, name: torch.ones(3, dtype=torch.bool)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match="classifier.weight"):
        load_mask(tmp_path / "shape.safetensors", params)
    save_mask({n: m for n, m in masks.items() if n != name}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="classifier.weight"):
        cb = SparseUpdateCallback(mask_file=tmp_path / "missing.safetensors")
        _train(tmp_path / "run", [cb], max_steps=1)
    with pytest.raises(FileExistsError):
        save_mask(masks, tmp_path / "shape.safetensors")


def test_resumed_equals_uninterrupted(tmp_path):
    """The mask comes from the checkpoint: recomputed from |θ| at step 4 it would differ."""
    make = lambda: SparseUpdateCallback(density=0.1, scores="magnitude")  # noqa: E731
    want = _weights(_train(tmp_path / "full", [make()]).model)
    _train(tmp_path / "part", [make(), stop_at(4)], save_strategy="steps", save_steps=4)
    resumed = make()
    got = _weights(_train(tmp_path / "part", [resumed], resume=True).model)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(density=0.0, scores="magnitude"), "density"),
        (dict(density=2, scores="magnitude"), "density"),
        (dict(scores="bogus"), "scores"),
        (dict(scores=3), "scores"),
        (dict(), "fisher_data"),
        (dict(scores="magnitude", fisher_examples=0), "fisher_examples"),
        (dict(mask_file="/nonexistent/mask.safetensors"), "mask_file"),
        (dict(scores="magnitude", save_mask=3), "save_mask"),
    ],
)
def test_bad_option_is_refused_at_construction(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SparseUpdateCallback(**kwargs)


def test_existing_save_mask_and_mask_file_with_scores_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_mask({"w": torch.ones(2, dtype=torch.bool)}, path)
    with pytest.raises(ValueError, match="save_mask"):
        SparseUpdateCallback(scores="magnitude", save_mask=path)
    with pytest.raises(ValueError, match="mask_file"):
        SparseUpdateCallback(scores="magnitude", mask_file=path)


@pytest.mark.parametrize("where", FAILURES)
def test_a_failed_run_leaves_the_model_training_like_a_fresh_copy(tmp_path, where):
    """train() raises at step 3: no hook is left on the model, and a later plain run on it equals the same run
    on a fresh copy (a gradient mask left behind would keep 90% of the entries still)."""
    model = tiny_bert()
    cb = SparseUpdateCallback(density=0.1, scores="magnitude")
    trainer = fail_training(model, tmp_path / "failed", [cb], where, step=3, **ADAMW)
    assert_nothing_attached(model)
    assert_trains_like_a_fresh_copy(model, tiny_bert, tmp_path, **ADAMW, max_steps=3)
    # the failed Trainer itself, trained again without the callback, trains the frozen entries
    trainer.remove_callback(cb)
    disarm(trainer)
    before = _weights(model)
    trainer.train()
    after = _weights(model)
    frozen = sum(int((~m).sum()) for m in cb.masks.values())
    moved = sum(int((after[n][~m] != before[n][~m]).sum()) for n, m in cb.masks.items())
    assert moved > 0.9 * frozen
    for owner in (trainer.training_step, trainer._clip_grad_norm, trainer.optimizer.step):
        assert getattr(owner, "robustft_owner", None) is None


def test_training_again_after_a_failure_with_the_callback_replaces_its_leftover_wrappers(tmp_path):
    """The failed run's wrappers are replaced (not stacked, not reused) by the next run's; the frozen entries
    stay bit-identical through it."""
    model = tiny_bert()
    cb = SparseUpdateCallback(density=0.1, scores="magnitude")
    trainer = fail_training(model, tmp_path, [cb], "on_step_end", step=2, **ADAMW)
    stale = trainer.training_step
    assert stale.robustft_owner is cb
    disarm(trainer)
    before = _weights(model)
    seen = []

    class Chain(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            link, owners = trainer.training_step, []
            while getattr(link, "robustft_owner", None) is not None:
                owners.append((link.robustft_owner, link is stale))
                link = link.robustft_original
            seen.append(owners)

    trainer.add_callback(Chain())
    trainer.train()
    assert seen and all(owners == [(cb, False)] for owners in seen)
    after = _weights(model)
    for name, m in cb.masks.items():
        assert torch.equal(after[name][~m].view(torch.int32), before[name][~m].view(torch.int32)), name
