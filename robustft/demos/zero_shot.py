"""Zero-shot classification heads from label descriptions, the CLIP-style start point of WiSE-FT.

A sentence encoder maps a text to the normalised mean of its token states. The zero-shot
classifier scores a text by the cosine similarity of its embedding with the embedding of each
label's description(s), times a logit scale (CLIP: Radford et al., 2021). Written as a linear
head ``logits = x̂ · Wᵀ`` with ``W[c] = scale · normalise(mean_k ê(description_{c,k}))`` it is an
ordinary ``classifier`` Linear layer, so fine-tuning starts from a real zero-shot model and
interpolating the head (WiSE-FT) is meaningful.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from robustft.core.params import train_mode

__all__ = [
    "SentenceClassifier",
    "embed_texts",
    "install_zero_shot_head",
    "mean_pool",
    "zero_shot_weights",
]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """e = Σ_t m_t·h_t / Σ_t m_t: mean of the token states over real (unpadded) tokens."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(
    encoder: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    normalize: bool = True,
) -> torch.Tensor:
    """[len(texts), hidden] mean-pooled (and L2-normalised) sentence embeddings from ``encoder``."""
    device = next(encoder.parameters()).device
    with train_mode(encoder, False):
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(**batch).last_hidden_state
            emb = mean_pool(hidden, batch["attention_mask"])
            out.append(nn.functional.normalize(emb, dim=-1) if normalize else emb)
        return torch.cat(out).float()


def zero_shot_weights(
    encoder: nn.Module, tokenizer, descriptions: Sequence[str | Sequence[str]], logit_scale: float = 20.0
) -> torch.Tensor:
    """W[c] = scale · normalise(mean_k ê(d_{c,k})): one row per label from its description(s).

    Several descriptions per label are averaged after normalisation (CLIP's prompt ensembling).
    """
    if not descriptions:
        raise ValueError("descriptions: at least one label description is needed")
    groups = []
    for c, desc in enumerate(descriptions):
        texts = [desc] if isinstance(desc, str) else list(desc)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(
                f"descriptions[{c}]: expected a non-empty string or list of strings, got {desc!r}"
            )
        groups.append(texts)
    rows = [nn.functional.normalize(embed_texts(encoder, tokenizer, t).mean(dim=0), dim=0) for t in groups]
    return logit_scale * torch.stack(rows)


class SentenceClassifier(nn.Module):
    """logits = normalise(mean_pool(encoder(x))) · Wᵀ + b: a sentence encoder with a linear ``classifier``.

    Behaves like an ``AutoModelForSequenceClassification`` for the Trainer (takes ``labels``,
    returns ``SequenceClassifierOutput`` with the cross-entropy loss); features are the
    normalised mean-pooled token states the zero-shot head was built from.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, id2label: dict[int, str] | None = None):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels: a classifier needs at least 2 labels, got {num_labels}")
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.zeros_(self.classifier.bias)
        self.num_labels = num_labels
        self.id2label = dict(id2label or {i: str(i) for i in range(num_labels)})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_labels: int, **kwargs) -> SentenceClassifier:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(str(path), **kwargs), num_labels)

    @property
    def config(self):
        return self.encoder.config

    def features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **_):
        logits = self.classifier(self.features(input_ids, attention_mask, token_type_ids))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def install_zero_shot_head(
    model: SentenceClassifier,
    tokenizer,
    descriptions: Sequence[str | Sequence[str]],
    logit_scale: float = 20.0,
) -> torch.Tensor:
    """Write the zero-shot weights into ``model.classifier`` (bias 0); returns the weights."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ValueError("model: expected a `classifier` nn.Linear head (e.g. a robustft SentenceClassifier)")
    if len(descriptions) != head.out_features:
        raise ValueError(
            f"descriptions: {len(descriptions)} label descriptions for a head with {head.out_features} labels"
        )
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError("model: expected an `encoder` attribute producing last_hidden_state")
    w = zero_shot_weights(encoder, tokenizer, descriptions, logit_scale)
    head.weight.copy_(w.to(head.weight))
    if head.bias is not None:
        head.bias.zero_()
    return w
