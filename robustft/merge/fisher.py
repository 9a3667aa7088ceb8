"""Diagonal Fisher information of a model on a dataset, for Fisher-weighted merging (``fisher`` method).

Lives outside ``ops/`` because it runs the model. The result is name -> tensor, saved with
``save_fisher`` as safetensors whose names match the checkpoint's, so a recipe can point at it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from robustft import distributed
from robustft.checkpoint import atomic_output_file
from robustft.params import select_parameters

__all__ = ["estimate_fisher", "save_fisher"]


def _examples(batch: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"estimate_fisher: batch tensors disagree on the batch size: {sorted(sizes)}")
    for i in range(sizes.pop()):
        yield {k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}


def _default_loss(model: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**example)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "estimate_fisher: the model returned no loss; put labels in the batch or pass loss_fn"
        )
    return loss


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    max_examples: int | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    across_ranks: bool = False,
) -> dict[str, torch.Tensor]:
    """F_j = (1/N) sum_n (d loss_n / d theta_j)^2: the empirical diagonal Fisher over N single examples.

    With the default loss (the model's own ``loss``, i.e. the negative log-likelihood of the labels in the
    batch) this is the empirical Fisher of Fisher-weighted averaging (Matena & Raffel, 2022). Batches are
    split into single examples, because the square of a batch gradient is not the mean of the squares.
    The model runs in eval mode (restored afterwards) and its ``.grad`` fields are not touched.
    Returns float32 CPU tensors keyed by parameter name (trainable parameters, filtered by include/exclude).

    ``across_ranks=True`` (a collective: every rank must call it): the sums and N are added over the ranks
    of a distributed run, so every rank gets the Fisher of all the ranks' examples together (each rank's
    ``max_examples`` caps its own share): the whole set's Fisher when each rank reads its own share, the
    same Fisher as one process when every rank reads the same data.
    """
    params = select_parameters(model, include=include, exclude=exclude)
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    fisher = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in tensors]
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in dataloader:
            for example in _examples(batch):
                example = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in example.items()}
                loss = loss_fn(model, example)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for f, g in zip(fisher, grads, strict=True):
                    if g is not None:
                        f.add_(g.detach().float().pow(2))
                n += 1
                if max_examples is not None and n >= max_examples:
                    break
            if max_examples is not None and n >= max_examples:
                break
    finally:
        model.train(was_training)
    if across_ranks:
        for f in fisher:
            distributed.all_reduce_sum(f)
        n = int(distributed.all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=device)).item())
    if n == 0:
        raise ValueError("estimate_fisher: the dataloader yielded no examples")
    return {name: (f / n).cpu() for name, f in zip(names, fisher, strict=True)}


def save_fisher(fisher: Mapping[str, torch.Tensor], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Fisher (name -> tensor) to ``path`` as safetensors, atomically; no overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    with atomic_output_file(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in fisher.items()}, str(tmp), metadata={"format": "pt"}
        )
    return path
