"""examples/bang_wise_ft.py: label smoothing + mixup fine-tuning then WiSE-FT on the real encoder; and its
mixup loss against the formula written out by hand on a tiny classifier."""

import json

import pytest
import torch
from torch import nn

from tests.examples import ROOT, run_example


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bang_wise_ft", ROOT / "examples" / "bang_wise_ft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tiny(nn.Module):
    """A head `classifier` fed by the features, as SentenceClassifier: what MixupTrainer mixes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.classifier = nn.Linear(4, 3)
        self.config = None  # the Trainer reads model.config

    def features(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.embed(input_ids).mean(1)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.classifier(self.features(input_ids))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_mixup_loss_is_the_mixed_cross_entropy_and_eval_is_plain(tmp_path):
    import numpy as np
    from transformers import TrainingArguments

    bang = _load_example()
    model = _Tiny()
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.1)
    trainer = bang.MixupTrainer(model=model, args=args, mixup_alpha=0.4, mixup_seed=3)
    batch = {"input_ids": torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(1)),
             "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    rng = np.random.default_rng(3)  # the same draws, by hand: λ ~ Beta(0.4, 0.4), then the pairing
    lam = rng.beta(0.4, 0.4)
    perm = rng.permutation(6)
    h = model.embed(batch["input_ids"]).mean(1)
    logits = model.classifier(lam * h + (1 - lam) * h[perm])
    y = batch["labels"]
    want = 0.0
    for i in range(6):  # smoothed cross-entropy per example: (1−ε)·(−log p_y) + ε·mean_k(−log p_k)
        logp = torch.log_softmax(logits[i], -1)
        ce_i, ce_j = (0.9 * -logp[c] + 0.1 * -logp.mean() for c in (y[i], y[perm[i]]))
        want = want + (lam * ce_i + (1 - lam) * ce_j) / 6
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    model.eval()
    _, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(out["logits"], model.classifier(h))  # no mixing when evaluating
    with pytest.raises(ValueError, match="mixup_alpha"):
        bang.MixupTrainer(model=model, args=args, mixup_alpha=0)


@pytest.mark.slow
def test_bang_example_runs(tmp_path):
    out = run_example("bang_wise_ft.py", "--recipe", "both", "--out", str(tmp_path), "--train-size", "64",
                      "--eval-size", "32", "--epochs", "1")
    result = json.loads((tmp_path / "bang.json").read_text())
    curve = json.loads((tmp_path / "wise_ft.json").read_text())
    assert result["label_smoothing"] == 0.1 and result["mixup_alpha"] == 0.4 and "WiSE-FT at α*" in out
    ids = curve["results"]["id"]
    assert ids[curve["alphas"].index(result["chosen_alpha"])] == max(ids)
