"""DaWin: training-free dynamic weight interpolation, per input, from the endpoints' prediction entropies.

DaWin (Oh et al., 2025, "DaWin: Training-free Dynamic Weight Interpolation for Robust Adaptation",
arXiv:2410.03782) sets, for each input x,

    λ(x) = e^{−H_ft(x)} / (e^{−H_start(x)} + e^{−H_ft(x)}) = sigmoid(H_start(x) − H_ft(x))

where H is the entropy of the prediction of the start (α=0) and the fine-tuned (α=1) model, and predicts
x with θ(λ(x)) = (1−λ)·θ_start + λ·θ_ft: the model that is more confident on x gets more weight. To
avoid one interpolation per input, a mixture of K Beta distributions is fitted to the λ values, each input
goes to its most likely component, and each component is evaluated at one α (:func:`component_alphas`).
Two procedures (``PROCEDURES``):

- ``"paper"`` (the authors' code): the mixture from k-means-initialised EM with their method-of-moments
  M-step, 3 restarts keeping the best likelihood (:func:`fit_beta_mixture_kmeans`), and each component at
  its fitted Beta mean α_k = a_k/(a_k+b_k);
- ``"routed_mean"`` (robustft before issue 22): EM from equal-count quantile groups
  (:func:`fit_beta_mixture`, M-steps as in Arazo et al., 2019, arXiv:1904.11238), and each component at the
  mean λ of the inputs routed to it. With K=1 this is WiSE-FT at α = mean λ, bit for bit.

Pure tensor maths; applying the α's to a model is ``robustft.interpolation.wise_ft.evaluate_at_alphas``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robustft.ops.dtypes import compute_dtype
from robustft.ops.outputs import model_logits

__all__ = [
    "PROCEDURES",
    "BetaMixture",
    "batch_entropy",
    "beta_mixture_em",
    "causal_lm_mask",
    "check_procedure",
    "component_alphas",
    "dawin_lambda",
    "fit_beta_mixture",
    "fit_beta_mixture_kmeans",
    "kmeans_1d",
    "prediction_entropy",
]

#: λ is clamped to [EPS, 1 − EPS] before the Beta densities are evaluated (they are infinite at 0 and 1)
EPS = 1e-4
#: the authors' guard against empty components and zero variances (10 machine epsilons of float64)
_TINY = 10 * torch.finfo(torch.float64).eps
#: how a DaWin mixture is fitted and where each component is evaluated (module docstring); first: default
PROCEDURES = ("paper", "routed_mean")


def check_procedure(procedure: str) -> str:
    """``procedure`` if it is one of :data:`PROCEDURES`, else a ValueError naming the option."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure: {procedure!r} is not one of {', '.join(PROCEDURES)}")
    return procedure


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """H(x) = −Σ_c p_c log p_c, p = softmax(logits) over the last dimension; one value per input.

    ``logits`` is (N, C) for a classifier, or (N, T, C) per position (a causal LM's next-token logits):
    then H(x) is the mean token entropy over the positions where ``mask`` (N, T) is true (all when None),
    so a sequence's entropy does not grow with its length. Computed in float32 (float64 stays).
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape (N, C) or (N, T, C), got {tuple(logits.shape)}")
    work = compute_dtype(logits.dtype)
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
    #: x is clamped to [eps, 1 − eps] in the densities (the paper's fit: only against log 0)
    eps: float = EPS

    @property
    def means(self) -> torch.Tensor:
        """a_k/(a_k+b_k): each component's Beta mean (the α the paper evaluates it at)."""
        return self.a / (self.a + self.b)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) log π_k + log Beta(x_i; a_k, b_k), x clamped to [eps, 1−eps]."""
        x = x.to(self.a.dtype).clamp(self.eps, 1 - self.eps)[:, None]
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
    x = _check_unit_values(x, n_components).clamp(EPS, 1 - EPS)
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


def component_alphas(
    lam: torch.Tensor, assignment: torch.Tensor, mixture: BetaMixture | None = None
) -> tuple[list[float], list[torch.Tensor]]:
    """(α_k, indices of component k) for every non-empty component.

    α_k = a_k/(a_k+b_k), the fitted Beta mean of ``mixture`` (the paper's procedure), or without a mixture
    the mean λ of the inputs routed to k (``"routed_mean"``; one component: α = mean λ, static WiSE-FT).
    One interpolation per component serves all of its inputs.
    """
    if lam.shape != assignment.shape or lam.dim() != 1:
        raise ValueError(f"lam and assignment: expected equal 1-D shapes, got {tuple(lam.shape)} "
                         f"and {tuple(assignment.shape)}")
    alphas, groups = [], []
    for k in assignment.unique(sorted=True).tolist():
        idx = (assignment == k).nonzero().flatten()
        alpha = lam[idx].to(torch.float64).mean() if mixture is None else mixture.means[k]
        alphas.append(float(alpha))
        groups.append(idx)
    return alphas, groups


def kmeans_1d(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Labels (N,) of Lloyd's k-means on scalars from greedy k-means++ seeding, as scikit-learn's ``KMeans``.

    The seeding draws from ``torch.Generator().manual_seed(seed)`` (not scikit-learn's random stream): the
    first centre uniformly, then each next one as the best of 2 + ⌊ln k⌋ candidates drawn ∝ D² (the one
    that lowers the total D² most). Lloyd's steps stop when the labels no longer change or the centres move
    less than ``tol`` × var(x) in total squared shift; the labels are those of the final centres. A centre
    left without points keeps its place.
    """
    x = x.detach().flatten().to(torch.float64)
    if k < 1 or x.numel() < k:
        raise ValueError(f"kmeans_1d: {x.numel()} values for {k} clusters")
    g = torch.Generator().manual_seed(int(seed))
    trials = 2 + int(math.log(k))
    centres = x[torch.randint(x.numel(), (1,), generator=g)]
    d2 = (x - centres[0]) ** 2
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # every point sits on a centre: fewer distinct values than k
            centres = torch.cat([centres, centres[:1]])
            continue
        cand = torch.multinomial(d2, trials, replacement=True, generator=g)
        pots = torch.minimum(d2[None, :], (x[None, :] - x[cand][:, None]) ** 2)
        best = int(pots.sum(1).argmin())
        centres = torch.cat([centres, x[cand[best]].reshape(1)])
        d2 = pots[best]
    threshold = tol * float(x.var(correction=0))
    labels = None
    for _ in range(max_iter):
        new = ((x[:, None] - centres[None, :]) ** 2).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros(k, dtype=x.dtype).index_add_(0, labels, x)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        if shift <= threshold:
            break
    return ((x[:, None] - centres[None, :]) ** 2).argmin(1)


def _paper_m_step(x: torch.Tensor, r: torch.Tensor) -> BetaMixture:
    """The authors' M-step: π_k ∝ n_k, m_k and v_k the r-weighted mean and variance, v_k capped at
    m_k(1−m_k)/4, c_k = m_k(1−m_k)/v_k − 1, (a_k, b_k) = (c_k·m_k, c_k·(1−m_k)); n_k and v_k get 10 float64
    epsilons (empty components), the division another 1e-10."""
    counts = r.sum(0) + _TINY
    mean = (r * x[:, None]).sum(0) / counts
    var = (r * x[:, None] ** 2).sum(0) / counts - mean**2
    var = torch.minimum(var, mean * (1 - mean) / 4) + _TINY
    c = mean * (1 - mean) / (var + 1e-10) - 1
    return BetaMixture(counts / counts.sum(), c * mean, c * (1 - mean), eps=1e-12)


@torch.no_grad()
def beta_mixture_em(
    x: torch.Tensor, resp: torch.Tensor, max_iter: int = 1000, tol: float = 1e-4
) -> BetaMixture:
    """The authors' EM from initial responsibilities ``resp`` (N, K): an M-step, then E/M steps until the mean
    log-likelihood (of the E-step) changes by less than ``tol``; ``log_likelihood`` is that last E-step's."""
    x = x.detach().flatten().to(torch.float64)
    mix = _paper_m_step(x, resp.to(torch.float64) + _TINY)
    ll, n_iter = -math.inf, 0
    while n_iter < max_iter:
        n_iter += 1
        previous = ll
        joint = mix.log_joint(x)
        total = torch.logsumexp(joint, dim=1)
        ll = float(total.mean())
        mix = _paper_m_step(x, (joint - total[:, None]).exp())
        if abs(ll - previous) < tol:
            break
    mix.log_likelihood, mix.n_iter = ll, n_iter
    return mix


def _check_unit_values(x: torch.Tensor, n_components: int) -> torch.Tensor:
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components: expected a positive integer, got {n_components!r}")
    x = x.detach().flatten().to(torch.float64)
    if x.numel() < n_components:
        raise ValueError(f"x: {x.numel()} values for {n_components} Beta components")
    if not bool(torch.isfinite(x).all()) or bool(((x < 0) | (x > 1)).any()):
        raise ValueError("x: Beta mixture values must be finite and in [0, 1]")
    return x


@torch.no_grad()
def fit_beta_mixture_kmeans(
    x: torch.Tensor, n_components: int = 3, n_init: int = 3, seed: int = 1, max_iter: int = 1000,
    tol: float = 1e-4,
) -> BetaMixture:
    """DaWin's Beta mixture as the authors fit it: k-means initialisation, EM (:func:`beta_mixture_em`).

    For each of ``n_init`` rounds r: k-means (:func:`kmeans_1d`, seed ``seed + r``) gives one-hot
    responsibilities, EM runs from them, and the round with the highest final mean log-likelihood is kept
    (the first on ties). K is lowered to the number of distinct values when there are fewer. Components are
    sorted by their Beta mean a/(a+b). Computed in float64.
    """
    x = _check_unit_values(x, n_components)
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init: expected a positive integer, got {n_init!r}")
    k = min(n_components, int(x.unique().numel()))
    best = None
    for r in range(n_init):
        labels = kmeans_1d(x, k, seed=seed + r)
        mix = beta_mixture_em(x, torch.nn.functional.one_hot(labels, k).to(torch.float64), max_iter, tol)
        if best is None or mix.log_likelihood > best.log_likelihood:
            best = mix
    order = best.means.argsort()
    return BetaMixture(best.weights[order], best.a[order], best.b[order], best.log_likelihood, best.n_iter,
                       eps=best.eps)


def batch_entropy(logits, labels, causal: bool) -> torch.Tensor:
    """Per-input prediction entropy of one evaluation batch (the Trainer's ``preprocess_logits_for_metrics``).

    Per-position logits (N, T, C) are averaged over the positions with a label: for a causal LM those
    predicting a token (labels shifted by one, :func:`causal_lm_mask`), otherwise
    (token classification) those whose own label is not -100; all positions when there are no labels.
    """
    logits = model_logits(logits)
    mask = None
    if logits.dim() == 3 and isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:2]:
        mask = causal_lm_mask(labels) if causal else labels != -100
    return prediction_entropy(logits, mask)
