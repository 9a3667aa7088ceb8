"""Learned per-block coefficients of task vectors (aTLAS, layer-wise AdaMerging): blocks and the composed θ.

θ = θ_start + Σ_k Σ_b α_{k,b} τ_{k,b}: one coefficient per task vector τ_k = θ_k − θ_start and per
parameter block b (one tensor, or the tensors whose names share a pattern match, e.g. a layer index). aTLAS
(Zhang et al., 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
arXiv:2407.02880) learns α on a few labelled examples; AdaMerging (Yang et al., 2024, arXiv:2310.02575)
by prediction-entropy minimisation on unlabelled inputs. With one task vector and one block this is
WiSE-FT at a learned α.

Pure tensor maths: the block assignment of tensor names and the (differentiable) composition; learning α
through ``torch.func.functional_call`` is ``robustft.interpolation.learned.LearnedInterpolation``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

__all__ = ["BLOCKINGS", "assign_blocks", "check_task_vectors", "compose_weights", "task_vectors"]

#: named block assignments; any other string is a regular expression (see :func:`assign_blocks`)
BLOCKINGS = {
    "all": None,  # one block for every tensor
    "tensor": None,  # one block per tensor (layer-wise AdaMerging)
    "layer": r"\.(\d+)\.",  # tensors sharing a layer index ``.<i>.``; the others one block each
}


def assign_blocks(names: Sequence[str], blocks: str = "tensor") -> tuple[list[str], list[int]]:
    """(block names, the block index of each tensor name), blocks in order of first appearance.

    ``blocks``: ``"tensor"`` (one per tensor), ``"all"`` (one for the model), ``"layer"`` (the tensors whose
    names contain the same ``.<i>.`` layer index), or a regular expression: tensors whose first ``re.search``
    match (its first group when it has one) is equal share a block; a tensor it does not match is a block of
    its own.
    """
    names = list(names)
    if not names:
        raise ValueError("names: no tensors to assign to blocks")
    if not isinstance(blocks, str) or not blocks:
        raise ValueError(f"blocks: expected 'tensor', 'all', 'layer' or a regular expression, got {blocks!r}")
    if blocks == "all":
        return ["all"], [0] * len(names)
    pattern = BLOCKINGS.get(blocks, blocks)
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except re.error as err:
        raise ValueError(f"blocks: {blocks!r} is not a valid regular expression ({err})") from err
    order: dict[str, int] = {}
    index = []
    for name in names:
        match = regex.search(name) if regex is not None else None
        key = name if match is None else (match.group(1) if regex.groups else match.group(0))
        index.append(order.setdefault(key, len(order)))
    return list(order), index


def check_task_vectors(
    start: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    """ValueError naming the task vector and tensor when τ_k lacks, adds or reshapes a tensor of ``start``."""
    if not vectors:
        raise ValueError("task_vectors: none given; need at least one fine-tuned model / task vector")
    for k, tau in enumerate(vectors):
        missing = [n for n in start if n not in tau]
        extra = [n for n in tau if n not in start]
        if missing or extra:
            raise ValueError(f"task vector {k}: tensors differ from the start's: missing {missing[:5]}, "
                             f"extra {extra[:5]}")
        for n, s in start.items():
            if tuple(tau[n].shape) != tuple(s.shape):
                raise ValueError(f"task vector {k}, tensor {n!r}: shape {tuple(tau[n].shape)}, start has "
                                 f"{tuple(s.shape)}")


@torch.no_grad()
def task_vectors(
    start: Mapping[str, torch.Tensor], ends: Sequence[Mapping[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """τ_k = θ_k − θ_start for every end point, per tensor (shapes checked first, named in the error)."""
    check_task_vectors(start, ends)
    return [{n: e[n].detach() - s.detach() for n, s in start.items()} for e in ends]


def compose_weights(
    start: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    coefficients: torch.Tensor,
    block_index: Sequence[int],
) -> dict[str, torch.Tensor]:
    """θ_n = start_n + Σ_k coefficients[k, block(n)]·τ_k,n for every tensor n (differentiable in α).

    ``coefficients`` is (K, B); ``block_index`` gives each tensor's block in the order of ``start``. Each θ_n
    is computed in the start tensor's dtype; the result is the name->tensor mapping ``functional_call`` takes.
    """
    if coefficients.dim() != 2 or coefficients.shape[0] != len(vectors):
        raise ValueError(f"coefficients: expected shape (K={len(vectors)}, blocks), got "
                         f"{tuple(coefficients.shape)}")
    if len(block_index) != len(start):
        raise ValueError(f"block_index: {len(block_index)} entries for {len(start)} tensors")
    if block_index and not 0 <= min(block_index) <= max(block_index) < coefficients.shape[1]:
        raise ValueError(f"block_index: blocks {min(block_index)}..{max(block_index)} for "
                         f"{coefficients.shape[1]} coefficient columns")
    out = {}
    for (name, s), b in zip(start.items(), block_index, strict=True):
        theta = s
        for k, tau in enumerate(vectors):
            theta = theta + coefficients[k, b].to(s.dtype) * tau[name]
        out[name] = theta
    return out
