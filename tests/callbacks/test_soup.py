"""SoupCallback in real Trainer runs with save_steps: the soup of the run's checkpoints against the torch mean
of the saved files and a hand-written loop of Alg. 1 (Wortsman et al. 2022), composed with WiSE-FT."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from robustft.callbacks import SoupCallback, WiseFTCallback
from tests.callbacks.settings import tiny_lora
from tests.tiny import tiny_bert, token_dataset, training_args

ARGS = dict(max_steps=6, save_strategy="steps", save_steps=2)


def _train(out, callbacks, model=None, **kw):
    model = tiny_bert(0) if model is None else model
    trainer = Trainer(
        model=model,
        args=training_args(out, **{**ARGS, **kw}),
        train_dataset=token_dataset(),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _checkpoint(out, step):
    return load_file(out / f"checkpoint-{step}" / "model.safetensors")


def _mean(states):
    return {
        n: torch.stack([s[n] for s in states]).mean(0) for n in states[0] if states[0][n].is_floating_point()
    }


def test_uniform_soup_of_the_last_checkpoints_is_their_mean(tmp_path):
    soup = SoupCallback(last=2, save_dir="auto")
    trainer = _train(tmp_path, [soup])
    want = _mean([_checkpoint(tmp_path, 4), _checkpoint(tmp_path, 6)])
    live = trainer.model.state_dict()
    for n in want:
        torch.testing.assert_close(live[n], want[n], atol=1e-7, rtol=1e-6)
    saved = load_file(tmp_path / "soup" / "model.safetensors")
    for n in want:
        torch.testing.assert_close(saved[n], want[n], atol=1e-7, rtol=1e-6)
    assert soup.result.kept == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow  # two Trainer runs
def test_the_final_weights_join_when_the_last_step_was_not_saved(tmp_path):
    trained = _train(tmp_path / "plain", [], max_steps=5).model.state_dict()
    trainer = _train(tmp_path / "soup", [SoupCallback()], max_steps=5)
    want = _mean([_checkpoint(tmp_path / "soup", 2), _checkpoint(tmp_path / "soup", 4), trained])
    live = trainer.model.state_dict()
    for n in want:
        torch.testing.assert_close(live[n], want[n], atol=1e-7, rtol=1e-6)


@pytest.mark.slow  # two Trainer runs and about 15 evaluations
def test_greedy_soup_then_wise_ft_follows_algorithm_1(tmp_path):
    data = token_dataset(32, seed=4)
    ref_model = tiny_bert(0)
    start = {n: t.detach().clone() for n, t in ref_model.state_dict().items()}
    ref_trainer = Trainer(model=ref_model, args=training_args(tmp_path / "ref"))
    results = {}
    for order in ("soup-first", "wise-first"):
        soup = SoupCallback(
            method="greedy",
            eval_datasets={"id": data},
            metric="loss",
            greater_is_better=False,
            progress=False,
        )
        wise = WiseFTCallback(alpha=0.5)
        out = tmp_path / order
        trainer = _train(out, [soup, wise] if order == "soup-first" else [wise, soup])
        results[order] = trainer.model.state_dict(), soup.result
    states = [_checkpoint(tmp_path / "soup-first", s) for s in (2, 4, 6)]

    def loss(state):
        ref_model.load_state_dict({**start, **state})
        return ref_trainer.evaluate(eval_dataset=data)["eval_loss"]

    alone = [loss(s) for s in states]  # Alg. 1 by hand: lower loss is better
    order = sorted(range(3), key=lambda i: alone[i])
    kept, best = [order[0]], alone[order[0]]
    for i in order[1:]:
        trial = loss(_mean([states[j] for j in [*kept, i]]))
        if trial <= best:
            kept, best = [*kept, i], trial
    soup_weights = _mean([states[i] for i in kept])
    names = dict(tiny_bert(0).named_parameters())
    for live, result in results.values():
        assert result.kept == [f"checkpoint-{2 * (i + 1)}" for i in kept]
        assert result.soup["id"] == pytest.approx(best, rel=1e-5)
        for (
            n
        ) in names:  # WiSE-FT from the start to the soup (the soup is the end point: averaging phase first)
            torch.testing.assert_close(live[n], 0.5 * start[n] + 0.5 * soup_weights[n], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "soup-first" / "soup.json").is_file()


def test_bad_options_and_a_peft_run_are_refused(tmp_path):
    cases = [
        (lambda: SoupCallback(method="best"), "method"),
        (lambda: SoupCallback(method="greedy"), "eval_datasets"),
        (lambda: SoupCallback(last=0), "last"),
        (lambda: SoupCallback(copy_to_model_at_end=False), "save_dir"),
        (lambda: SoupCallback(eval_datasets={"a": 1, "b": 2}, id_dataset="c"), "id_dataset"),
        (lambda: SoupCallback(metric=""), "metric"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="robustft soup"):
        _train(tmp_path, [SoupCallback()], model=tiny_lora())
    assert not list(tmp_path.glob("checkpoint-*"))
