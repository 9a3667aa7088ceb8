"""WEMoE: weight-ensembling mixture of experts; one linear layer at a per-input weight, never materialised.

WEMoE (Tang et al., 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
arXiv:2402.00433) gives each MLP block the weights θ(x) = θ_start + Σ_k r_k(x) τ_k, with τ_k = θ_k − θ_start
the task vectors of K fine-tuned models and r(x) ∈ R^K the output of a small router on the block's input
hidden states. For a linear layer y = x Wᵀ + b the input-dependent layer is, by linearity,

    y = x W_startᵀ + b_start + Σ_k r_k(x) (x τ_{W,k}ᵀ + τ_{b,k})

so K + 1 matrix products per layer replace one weight matrix per input (FusionBench's ``we_moe`` builds the
merged state dict per sample). The activations between the linear layers of an MLP are not linear, so the
ensembling is done per linear layer inside the block, with the same r for all of them (as FusionBench, which
calls the whole block at the merged weights). The routing weights are per token, or per sequence (the mean of
the per-token router outputs over the sequence's positions, FusionBench's ``batch_first`` reduction, here
over the positions of the attention mask when one is known).

Pure tensor maths; the router module, upscaling a transformers model and its training are
``robustft.interpolation.wemoe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ROUTINGS", "ensembled_linear", "routing_weights"]

#: how the router's per-token outputs become routing weights
ROUTINGS = ("sequence", "token")


def routing_weights(gate: torch.Tensor, routing: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """r from the router's per-token outputs ``gate`` (N, T, K): (N, T, K) per token, (N, 1, K) per sequence.

    ``"sequence"``: r = mean over the positions t of gate[:, t] (those where ``mask`` (N, T) is true when
    given, e.g. the attention mask, so padding does not route); ``"token"``: r = gate (each token its own).
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    if gate.dim() != 3:
        raise ValueError(f"gate: expected shape (N, T, experts), got {tuple(gate.shape)}")
    if routing == "token":
        return gate
    if mask is None:
        return gate.mean(dim=1, keepdim=True)
    if tuple(mask.shape) != tuple(gate.shape[:2]):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the hidden states' (N, T) "
                         f"{tuple(gate.shape[:2])}")
    m = mask.to(device=gate.device, dtype=gate.dtype)[..., None]
    counts = m.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("mask: a sequence has no position to route on (all masked)")
    return (gate * m).sum(dim=1, keepdim=True) / counts


def ensembled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_vectors: torch.Tensor,
    bias_vectors: torch.Tensor | None,
    routing: torch.Tensor,
) -> torch.Tensor:
    """y = x Wᵀ + b + Σ_k r_k (x τ_{W,k}ᵀ + τ_{b,k}): the linear layer at W + Σ_k r_k τ_{W,k}, per input.

    ``x`` (..., in); ``weight`` (out, in) and ``weight_vectors`` (K, out, in); ``bias`` (out) and
    ``bias_vectors`` (K, out) or both None; ``routing`` (..., K) broadcastable against x's leading dimensions
    (per token (N, T, K) or per sequence (N, 1, K)). Exact by linearity, no per-input weight is built.
    """
    k = weight_vectors.shape[0] if weight_vectors.dim() == 3 else -1
    if weight.dim() != 2 or tuple(weight_vectors.shape[1:]) != tuple(weight.shape):
        raise ValueError(f"weight_vectors: expected shape (K, {', '.join(map(str, weight.shape))}), got "
                         f"{tuple(weight_vectors.shape)}")
    if (bias is None) != (bias_vectors is None):
        raise ValueError("bias and bias_vectors: give both or neither")
    if bias is not None and tuple(bias_vectors.shape) != (k, *bias.shape):
        raise ValueError(f"bias_vectors: expected shape ({k}, {bias.shape[0]}), got "
                         f"{tuple(bias_vectors.shape)}")
    if routing.shape[-1] != k or routing.dim() != x.dim():
        raise ValueError(f"routing: expected shape (..., {k}) with {x.dim()} dimensions like x, got "
                         f"{tuple(routing.shape)}")
    r = routing.to(x.dtype)
    y = F.linear(x, weight, bias)
    for i in range(k):
        tau_b = None if bias_vectors is None else bias_vectors[i]
        y = y + r[..., i : i + 1] * F.linear(x, weight_vectors[i], tau_b)
    return y
