"""Tiny models, data and a Trainer factory shared by the SAM tests, the example's test and the benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from tests import tiny

N_SAMPLES, SEQ_LEN, VOCAB, N_LABELS = 16, 8, 40, 3


def tiny_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    """tests/tiny.py's BERT sized for ``ToyData`` (its vocabulary, length and labels), without dropout."""
    return tiny.tiny_bert(seed, N_LABELS, hidden=hidden, vocab=VOCAB, positions=SEQ_LEN, dropout=0.0)


def tiny_lora_bert(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = tiny_bert(seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.0
    )
    peft_model = get_peft_model(model, cfg)
    # a non-zero B, so the merged weight differs from the base weight from the first step
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


class ToyData(torch.utils.data.Dataset):
    """Token sequences whose label is a function of the first token (learnable by the tiny model)."""

    def __init__(self, n: int = N_SAMPLES, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g)
        self.labels = self.ids[:, 0] % N_LABELS

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": self.labels[i],
        }

    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids), "labels": self.labels}


def make_trainer(
    model,
    out_dir,
    callbacks,
    *,
    ga=1,
    total_batch=N_SAMPLES,
    steps=3,
    lr=0.1,
    momentum=0.9,
    max_grad_norm=0.0,
    data=None,
    **extra,
) -> Trainer:
    extra.setdefault("save_strategy", "no")
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=total_batch // ga,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    return Trainer(
        model=model, args=args, train_dataset=data or ToyData(), callbacks=callbacks, optimizers=(opt, None)
    )


class MLP(torch.nn.Module):
    """A plain (non-transformers) classifier: the Trainer computes nothing but calls forward(x, labels)."""

    def __init__(self, d: int = 10, h: int = 64, k: int = 2):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, h),
            torch.nn.Tanh(),
            torch.nn.Linear(h, h),
            torch.nn.Tanh(),
            torch.nn.Linear(h, k),
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class NoisyLinearData(torch.utils.data.Dataset):
    """y = [x0 + x1 > 0] with 20% of the labels flipped: memorising the flips needs a sharp fit."""

    def __init__(self, n: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 10, generator=g)
        y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.y = torch.where(torch.rand(n, generator=g) < 0.2, 1 - y, y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@torch.no_grad()
def mean_loss_increase(
    model, data: NoisyLinearData, radius: float, draws: int = 100, seed: int = 123
) -> float:
    """E_d[L(w + radius·d/‖d‖) − L(w)] over random Gaussian directions d of the whole parameter vector."""
    params = list(model.parameters())
    base = model(data.x, data.y)["loss"].item()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        d = [torch.randn(p.shape, generator=g) for p in params]
        scale = radius / torch.sqrt(sum((x**2).sum() for x in d))
        for p, x in zip(params, d, strict=True):
            p.add_(x * scale)
        total += model(data.x, data.y)["loss"].item() - base
        for p, x in zip(params, d, strict=True):
            p.sub_(x * scale)
    return total / draws


def sam_loss(model, batch, label_smoothing: float, scale: float = 1.0) -> torch.Tensor:
    """The (scaled, label-smoothed) cross-entropy of a sequence classifier on one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return scale * F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)


def reference_sam(
    model,
    batch,
    steps,
    rho,
    adaptive,
    eta,
    clip,
    lr,
    momentum,
    label_smoothing=0.0,
    scale=1.0,
    only=None,
    start=0,
):
    """Two-step SAM (davda54/sam formulation) on the full batch, written independently of robustft.

    ``scale`` multiplies the loss: transformers 5.23 passes ``num_items_in_batch`` to models that
    accept loss kwargs (BERT does) and then does not divide by the accumulation steps, but BERT's
    classification loss ignores it - so with k micro-batches the Trainer's gradient is k times the
    full-batch mean gradient. Clipping hides the factor; without clipping the reference needs it.
    ``only``: perturb only parameters whose name contains it; ``start``: plain steps before SAM.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for step in range(steps):
        opt.zero_grad()
        sam_loss(model, batch, label_smoothing, scale).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        if step < start:
            opt.step()
            continue
        perturbed = [
            p for n, p in model.named_parameters() if p.requires_grad and (only is None or only in n)
        ]
        with torch.no_grad():
            t_w = [(p.abs() + eta) if adaptive else torch.ones_like(p) for p in perturbed]
            norm = torch.norm(
                torch.stack([(t * p.grad).norm(2) for t, p in zip(t_w, perturbed, strict=True)]), 2
            )
            old = [p.clone() for p in perturbed]
            for t, p in zip(t_w, perturbed, strict=True):
                p.add_(t * t * p.grad * (rho / (norm + 1e-12)))
        opt.zero_grad()
        sam_loss(model, batch, label_smoothing, scale).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        with torch.no_grad():
            for p, o in zip(perturbed, old, strict=True):
                p.copy_(o)
        opt.step()
    return model
