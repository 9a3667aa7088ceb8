"""examples/warm_reward_models.py: N reward models from one init with TRL's RewardTrainer, averaged by
robustft merge. The weight average equals the torch mean of the N saved state dicts; the scores the example
computes equal the ones RewardTrainer itself reports."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from tests.examples import ROOT, run_example  # noqa: E402


def load_example():
    path = ROOT / "examples" / "warm_reward_models.py"
    spec = importlib.util.spec_from_file_location("warm_reward_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_warm_pipeline_weight_average_is_the_mean_of_the_reward_models(tmp_path):
    warm = load_example()
    base, data = warm.tiny_setup(tmp_path / "tiny", n_train=16, n_eval=8)
    result = warm.run_warm(base, data, tmp_path / "run", n=3, learning_rates=[5e-3, 1e-2], steps=2,
                           batch_size=8, verbose=False)
    init, rms = state(tmp_path / "run" / "init"), [state(tmp_path / "run" / f"rm{i}") for i in range(3)]
    averaged = state(tmp_path / "run" / "warm")
    assert set(averaged) == set(init) and any("score" in n for n in averaged)
    for name, t in averaged.items():
        torch.testing.assert_close(t, torch.stack([rm[name] for rm in rms]).mean(0), rtol=1e-6, atol=1e-7,
                                   msg=name)
    # the N models really differ (seeds and learning rates) and all moved from the one init
    assert all(max((rm[n] - init[n]).abs().max().item() for n in init) > 1e-4 for rm in rms)
    assert max((rms[0][n] - rms[1][n]).abs().max().item() for n in init) > 1e-4
    rows = result["rows"]
    assert list(rows) == ["RM 0", "RM 1", "RM 2", "ensemble (mean reward)", "WARM (weight average)"]
    assert result["splits"] == ["id", "shifted"] and result["learning_rates"] == [5e-3, 1e-2, 5e-3]
    n_params = rows["RM 0"]["parameters"]
    assert rows["ensemble (mean reward)"]["parameters"] == 3 * n_params == 3 * rows["WARM (weight average)"][
        "parameters"]
    assert all(0.0 <= r[s] <= 1.0 for r in rows.values() for s in result["splits"])


def test_pair_rewards_score_what_reward_trainer_scores(tmp_path):
    """The example's own scoring (token ids, padding, the head's last token) against RewardTrainer's eval
    metrics on one batch of all pairs: the same mean margin and accuracy."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    warm = load_example()
    base, data = warm.tiny_setup(tmp_path / "tiny", n_train=8, n_eval=8)
    init = warm.make_init(base, tmp_path / "init", seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(init)
    tokenizer = AutoTokenizer.from_pretrained(init)
    rows = data["id"] + data["shifted"]
    args = RewardConfig(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=len(rows), use_cpu=True,
                        bf16=False, report_to=[], disable_tqdm=True)
    trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                            args=args)
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(rows))
    rewards = warm.pair_rewards(model, tokenizer, rows, batch_size=5)  # odd batches: padding must not matter
    assert rewards.shape == (len(rows), 2)
    assert abs(metrics["eval_margin"] - (rewards[:, 0] - rewards[:, 1]).mean().item()) < 1e-5
    assert metrics["eval_accuracy"] == pytest.approx(warm.accuracy(rewards))


@pytest.mark.slow
def test_warm_example_runs(tmp_path):
    out = run_example("warm_reward_models.py", "--output-dir", str(tmp_path), "--steps", "4")
    assert "WARM (weight average)" in out and "ensemble (mean reward)" in out
    assert (tmp_path / "warm" / "config.json").is_file() and (tmp_path / "warm.json").is_file()
