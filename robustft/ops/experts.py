"""MC-SMoE's expert merging, the pure maths (Li et al., ICLR 2024, "Merge, Then Compress: Demystify Efficient
SMoE with Hints from Its Routing Policy"), on one sparse MoE layer:

1. routing frequency f_i: the fraction of the sample's top-k routing slots that go to expert i;
2. dominant experts: the ``keep`` most frequent (ties to the lowest index);
3. grouping: every other expert joins the dominant expert whose router logits over the sample are the most
   similar (cosine of the columns H[:, i], H[:, j] of the T x E logit matrix; the paper's default
   "router-logits" similarity);
4. merging: each group's experts (neurons aligned to the dominant one beforehand, by weight matching in
   :mod:`robustft.merge.experts`) averaged with their frequencies as weights, Σ f_i W_i / Σ f_i
   (a uniform mean where no member was routed to);
5. compression (the "C" of MC-SMoE): each merged expert's matrices replaced by their best rank-r
   approximation (truncated SVD; the paper adds a structured sparse part, not done here).

Pure torch: no model, no files.
"""

from __future__ import annotations

import torch

__all__ = ["dominant_experts", "group_experts", "low_rank", "merge_groups", "routing_frequency"]


def routing_frequency(indices: torch.Tensor, experts: int) -> torch.Tensor:
    """f_i = (slots routed to expert i) / (all slots), from the router's top-k ``indices`` (T x k)."""
    if indices.numel() == 0:
        raise ValueError("routing_frequency: no routed tokens in the sample")
    counts = torch.bincount(indices.reshape(-1).long(), minlength=experts)[:experts]
    return counts.double() / indices.numel()


def dominant_experts(frequency: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` most frequently routed experts, most frequent first (equal frequencies: lowest index)."""
    experts = frequency.numel()
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= experts:
        raise ValueError(f"keep must be an integer in [1, {experts}] (the layer's experts), got {keep!r}")
    order = sorted(range(experts), key=lambda i: (-float(frequency[i]), i))
    return order[:keep]


def group_experts(logits: torch.Tensor, dominant: list[int]) -> list[int]:
    """group[i] = the dominant expert that expert i joins: itself if dominant, else the dominant expert whose
    router-logit column over the sample (``logits``: T x E) has the largest cosine similarity with i's."""
    h = logits.double()
    h = h / h.norm(dim=0, keepdim=True).clamp_min(1e-12)
    sim = h.T @ h  # E x E cosine similarities
    out = []
    for i in range(logits.shape[1]):
        if i in dominant:
            out.append(i)
        else:
            out.append(max(dominant, key=lambda d: (float(sim[i, d]), -d)))
    return out


def merge_groups(weights: torch.Tensor, groups: list[int],
                 frequency: torch.Tensor) -> dict[int, torch.Tensor]:
    """dominant expert -> Σ_{i in its group} f_i W_i / Σ f_i over ``weights`` (E x ...: one slice per expert,
    aligned beforehand); a group no token was routed to is averaged uniformly."""
    out = {}
    for d in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == d]
        f = frequency[members].double()
        f = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(members))
        w = weights[members].double()
        out[d] = torch.tensordot(f, w, dims=1).to(weights.dtype)
    return out


def low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix (or of each matrix of a stack), by truncated SVD."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    k = min(rank, s.shape[-1])
    return ((u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]).to(weight.dtype)
