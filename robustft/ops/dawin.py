"""DaWin: training-free dynamic weight interpolation, per input, from the endpoints' prediction entropies.

DaWin (Oh et al., 2025, "DaWin: Training-free Dynamic Weight Interpolation for Robust Adaptation",
arXiv:2410.03782) sets, for each input x,

    λ(x) = e^{−H_ft(x)} / (e^{−H_start(x)} + e^{−H_ft(x)}) = sigmoid(H_start(x) − H_ft(x))

where H is the entropy of the prediction of the start (α=0) and the fine-tuned (α=1) model, and predicts
x with θ(λ(x)) = (1−λ)·θ_start + λ·θ_ft: the model that is more confident on x gets more weight. To
avoid one interpolation per input, a mixture of K Beta distributions is fitted to the λ values
(:func:`fit_beta_mixture`, EM with weighted method-of-moments M-steps as in Arazo et al., 2019,
arXiv:1904.11238), each input goes to its most likely component, and each component is evaluated at
one α: the mean λ of its inputs (:func:`component_alphas`). With K=1 this is WiSE-FT at α = mean λ.

Pure tensor maths; applying the α's to a model is ``robustft.wise_ft.evaluate_at_alphas``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BetaMixture",
    "batch_entropy",
    "causal_lm_mask",
    "component_alphas",
    "dawin_lambda",
    "first_logits",
    "fit_beta_mixture",
    "prediction_entropy",
]

#: λ is clamped to [EPS, 1 − EPS] before the Beta densities are evaluated (they are infinite at 0 and 1)
EPS = 1e-4


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """H(x) = −Σ_c p_c log p_c, p = softmax(logits) over the last dimension; one value per input.

    ``logits`` is (N, C) for a classifier, or (N, T, C) per position (a causal LM's next-token logits):
    then H(x) is the mean token entropy over the positions where ``mask`` (N, T) is true (all when None),
    so a sequence's entropy does not grow with its length. Computed in float32 (float64 stays).
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape (N, C) or (N, T, C), got {tuple(logits.shape)}")
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(work), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if logits.dim() == 2:
        if mask is not None:
            raise ValueError("mask: only for per-position logits (N, T, C)")
        return h
    if mask is None:
        return h.mean(-1)
    if tuple(mask.shape) != tuple(h.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the logits' (N, T) "
                         f"{tuple(h.shape)}")
    mask = mask.to(device=h.device, dtype=torch.bool)
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        first = int((counts == 0).nonzero()[0])
        raise ValueError(f"mask: sequence {first} has no position to take the entropy of (all masked)")
    return torch.where(mask, h, torch.zeros_like(h)).sum(-1) / counts


def causal_lm_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(N, T) mask of the logits positions that predict a label: position t predicts token t+1.

    Hugging Face causal LMs shift inside the loss: logits[:, t] is scored against labels[:, t+1], so the
    last position and those followed by ``ignore_index`` (padding, prompt) are left out.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape (N, T), got {tuple(labels.shape)}")
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def dawin_lambda(h_start: torch.Tensor, h_ft: torch.Tensor) -> torch.Tensor:
    """λ = e^{−H_ft} / (e^{−H_start} + e^{−H_ft}) = sigmoid(H_start − H_ft): DaWin's per-input weight on θ_ft.

    The sigmoid form never overflows; the authors' code calls this ``negexp_ent_ratio``.
    """
    if h_start.shape != h_ft.shape:
        raise ValueError(f"entropies: start has shape {tuple(h_start.shape)}, fine-tuned {tuple(h_ft.shape)}")
    return torch.sigmoid(h_start - h_ft)


def _moments_to_beta(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Method of moments: a = m·c, b = (1−m)·c with c = m(1−m)/v − 1 (v kept inside (0, m(1−m)))."""
    mean = mean.clamp(EPS, 1 - EPS)
    top = mean * (1 - mean)
    var = torch.minimum(var.clamp_min(1e-12), top * (1 - 1e-6))
    c = top / var - 1
    return mean * c, (1 - mean) * c


@dataclass
class BetaMixture:
    """p(x) = Σ_k π_k Beta(x; a_k, b_k), components sorted by their mean a_k/(a_k+b_k)."""

    weights: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    log_likelihood: float = float("nan")
    n_iter: int = 0

    @property
    def means(self) -> torch.Tensor:
        return self.a / (self.a + self.b)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) log π_k + log Beta(x_i; a_k, b_k), x clamped to [EPS, 1−EPS]."""
        x = x.to(self.a.dtype).clamp(EPS, 1 - EPS)[:, None]
        log_beta = torch.lgamma(self.a + self.b) - torch.lgamma(self.a) - torch.lgamma(self.b)
        return self.weights.log() + log_beta + (self.a - 1) * x.log() + (self.b - 1) * torch.log1p(-x)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) posterior probability of each component for each x."""
        return torch.softmax(self.log_joint(x), dim=1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each x (ties to the lower index)."""
        return self.log_joint(x).argmax(dim=1)


@torch.no_grad()
def fit_beta_mixture(
    x: torch.Tensor, n_components: int = 3, max_iter: int = 200, tol: float = 1e-8
) -> BetaMixture:
    """EM for a K-component Beta mixture on values in [0, 1] (Arazo et al., 2019, arXiv:1904.11238).

    E-step: responsibilities r_ik ∝ π_k Beta(x_i; a_k, b_k). M-step: π_k = mean_i r_ik and (a_k, b_k) from
    the r-weighted mean and variance (method of moments; the Beta MLE has no closed form). Started from K
    equal-count quantile groups of x (deterministic); stops when the mean log-likelihood gains less than
    ``tol`` or after ``max_iter`` steps. Computed in float64.
    """
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components: expected a positive integer, got {n_components!r}")
    x = x.detach().flatten().to(torch.float64)
    if x.numel() < n_components:
        raise ValueError(f"x: {x.numel()} values for {n_components} Beta components")
    if not bool(torch.isfinite(x).all()) or bool(((x < 0) | (x > 1)).any()):
        raise ValueError("x: Beta mixture values must be finite and in [0, 1]")
    x = x.clamp(EPS, 1 - EPS)
    groups = torch.tensor_split(x.sort().values, n_components)
    means = torch.stack([g.mean() for g in groups])
    variances = torch.stack([g.var(correction=0) if g.numel() > 1 else g.new_tensor(0.0) for g in groups])
    # a group of identical values has no spread: give it a small one rather than an infinite density
    variances = torch.where(variances > 1e-8, variances, torch.full_like(variances, 1e-4))
    a, b = _moments_to_beta(means, variances)
    mix = BetaMixture(torch.full((n_components,), 1.0 / n_components, dtype=torch.float64), a, b)
    previous = -math.inf
    for step in range(1, max_iter + 1):
        joint = mix.log_joint(x)
        total = torch.logsumexp(joint, dim=1)
        ll = float(total.mean())
        r = (joint - total[:, None]).exp()
        mass = r.sum(0).clamp_min(1e-12)
        mean = (r * x[:, None]).sum(0) / mass
        var = (r * (x[:, None] - mean) ** 2).sum(0) / mass
        a, b = _moments_to_beta(mean, var)
        mix = BetaMixture((mass / x.numel()).clamp_min(1e-12), a, b, ll, step)
        if ll - previous < tol:
            break
        previous = ll
    order = mix.means.argsort()
    final = float(torch.logsumexp(mix.log_joint(x), dim=1).mean())
    return BetaMixture(mix.weights[order], mix.a[order], mix.b[order], final, mix.n_iter)


def component_alphas(lam: torch.Tensor, assignment: torch.Tensor) -> tuple[list[float], list[torch.Tensor]]:
    """(α_k, indices of component k) for every non-empty component: α_k = mean λ of its inputs.

    One interpolation per component serves all of its inputs; with one component α = mean λ (WiSE-FT).
    """
    if lam.shape != assignment.shape or lam.dim() != 1:
        raise ValueError(f"lam and assignment: expected equal 1-D shapes, got {tuple(lam.shape)} "
                         f"and {tuple(assignment.shape)}")
    alphas, groups = [], []
    for k in assignment.unique(sorted=True).tolist():
        idx = (assignment == k).nonzero().flatten()
        alphas.append(float(lam[idx].to(torch.float64).mean()))
        groups.append(idx)
    return alphas, groups


def first_logits(logits):
    """The logits of a model output that may be a tuple (logits first)."""
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def batch_entropy(logits, labels, causal: bool) -> torch.Tensor:
    """Per-input prediction entropy of one evaluation batch (the Trainer's ``preprocess_logits_for_metrics``).

    Per-position logits (N, T, C) are averaged over the positions with a label: for a causal LM those
    predicting a token (labels shifted by one, :func:`causal_lm_mask`), otherwise
    (token classification) those whose own label is not -100; all positions when there are no labels.
    """
    logits = first_logits(logits)
    mask = None
    if logits.dim() == 3 and isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:2]:
        mask = causal_lm_mask(labels) if causal else labels != -100
    return prediction_entropy(logits, mask)
