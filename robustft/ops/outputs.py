"""What a model's forward pass returned: its loss and logits, read the one way every robustft tool reads them.

A transformers model returns a ``ModelOutput`` (a mapping with attributes), a custom ``nn.Module`` often a
plain ``dict`` or an object with a ``loss`` attribute; as the Trainer does for mappings, the loss is the
``"loss"`` entry. Used by the Fisher estimate, learned coefficients and the sharpness diagnostics alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["model_logits", "model_loss", "sequence_losses"]


def model_loss(outputs: Any, batch: Any = None) -> torch.Tensor:
    """``outputs["loss"]`` of a mapping (``dict``, ``ModelOutput``), else ``outputs.loss``; a ValueError when
    there is none (no labels in the batch). ``batch`` is ignored: the signature of a ``loss_fn(outputs,
    batch)``, so it stands wherever one does."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(f"the model returned no loss ({type(outputs).__name__} without 'loss'); put labels "
                         "in the batches or pass a loss_fn")
    return loss


def model_logits(outputs: Any) -> torch.Tensor:
    """``outputs["logits"]`` of a mapping, else ``outputs.logits``, else the output itself (a tensor, or the
    first element of a tuple, as a model without a ModelOutput returns its logits)."""
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise ValueError(f"the model returned no logits ({type(outputs).__name__} without 'logits')")
        return outputs["logits"]
    logits = getattr(outputs, "logits", outputs)
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy of a causal LM: row i averages −log p(labels[i, t+1]) over
    its scored positions (labels ≠ ``ignore_index``), the per-item score behind a causal LM's loss (NaN for a
    row with none). ``logits`` (batch, length, vocab), ``labels`` (batch, length), float32 or wider."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"sequence_losses: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must be (batch, length, vocab) and (batch, length)")
    shifted = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    target = labels[:, 1:]
    mask = target != ignore_index
    nll = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), target.masked_fill(~mask, 0),
                                            reduction="none")
    return (nll * mask).sum(dim=1) / mask.sum(dim=1)
