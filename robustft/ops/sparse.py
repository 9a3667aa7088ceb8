"""Sparse updates: which entries of the weights may move (a mask) and keeping the others exactly still.

Pure tensor maths (no Trainer, no I/O); ``robustft.callbacks.sparse`` decides when to call it. A mask is a
bool tensor per parameter, True where the entry is trained; a 0-d ``False`` mask freezes a whole tensor
(LP-FT's probe phase) without a parameter-sized buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from robustft.checks import check_density
from robustft.ops.merge import top_k_mask

__all__ = ["keep_masked_", "magnitude_scores", "mask_gradient", "top_k_masks"]


def top_k_masks(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """m = 1 on the k = max(1, round(density·N)) largest scores over every tensor together, else 0.

    The global top-k of FISH masks (Sung et al., 2021, "Training Neural Networks with Fixed Sparse
    Masks", eq. 2: keep the k parameters of largest empirical Fisher); any score works (|θ|, |θ_ft − θ_0|).
    Exactly k entries are kept, ties at the cut going to the lowest flat index (tensors in the mapping's
    order): the one exact top-k of the package, :func:`robustft.ops.merge.top_k_mask`. A non-finite score is
    an error naming its tensor.
    """
    check_density("density", density)
    if not scores:
        raise ValueError("top_k_masks: no scores given")
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise ValueError(f"top_k_masks: scores of {name!r} hold NaN or Inf")
    first = next(iter(scores.values()))
    dtype = torch.float32
    for s in scores.values():  # float64 scores are compared in float64
        dtype = torch.promote_types(dtype, s.dtype)
    flat = torch.cat([s.detach().reshape(-1).to(first.device, dtype) for s in scores.values()])
    k = max(1, round(density * flat.numel()))
    keep = top_k_mask(flat, k)
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
    return masks


def magnitude_scores(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|θ| per entry: the magnitude criterion (train the largest weights), needing no data."""
    return {n: p.detach().abs().float() for n, p in params.items()}


def mask_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g ⊙ m, with masked entries exactly 0 even where g is NaN/Inf (so a frozen entry never poisons the
    clipping norm)."""
    return grad.masked_fill(~mask.to(grad.device), 0.0)


@torch.no_grad()
def keep_masked_(w: torch.Tensor, before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w ← m ? w : before, in place: the update is kept where m is True, the entries where it is False get
    their values from before the step back bit for bit (whatever weight decay or momentum did); returns w."""
    w.copy_(torch.where(mask.to(w.device), w, before))
    return w
