"""DaWin maths against independent references: numpy loops for entropies and λ, scipy's Beta density."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from robustft.ops.dawin import (
    beta_mixture_em,
    causal_lm_mask,
    component_alphas,
    dawin_lambda,
    fit_beta_mixture,
    fit_beta_mixture_kmeans,
    kmeans_1d,
    prediction_entropy,
)


def _entropy_np(row: np.ndarray) -> float:
    p = np.exp(row - row.max())
    p /= p.sum()
    return float(-sum(pi * math.log(pi) for pi in p if pi > 0))


def test_lambda_matches_the_negexp_entropy_ratio_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(50, 7, generator=g) * 3
    ft = torch.randn(50, 7, generator=g) * 3
    start[0] *= 40  # near one-hot: entropy ~ 0
    lam = dawin_lambda(prediction_entropy(start), prediction_entropy(ft))
    for i in range(50):
        hs, hf = _entropy_np(start[i].double().numpy()), _entropy_np(ft[i].double().numpy())
        want = math.exp(-hf) / (math.exp(-hs) + math.exp(-hf))
        assert lam[i].item() == pytest.approx(want, abs=1e-6), i
    assert lam.shape == (50,) and bool(((lam > 0) & (lam < 1)).all())


def test_more_confident_fine_tuned_model_gets_more_weight():
    confident, unsure = torch.tensor([[9.0, 0.0, 0.0]]), torch.zeros(1, 3)
    assert dawin_lambda(prediction_entropy(unsure), prediction_entropy(confident)).item() > 0.5
    assert dawin_lambda(prediction_entropy(confident), prediction_entropy(unsure)).item() < 0.5
    assert dawin_lambda(prediction_entropy(unsure), prediction_entropy(unsure)).item() == 0.5


def test_causal_lm_sequence_entropy_is_the_mean_over_positions_that_predict_a_label():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 4:] = -100  # padding
    mask = causal_lm_mask(labels)
    got = prediction_entropy(logits, mask)
    for i in range(3):
        # position t predicts token t+1 (the HF causal-LM shift)
        hs = [_entropy_np(logits[i, t].double().numpy()) for t in range(5) if labels[i, t + 1] != -100]
        assert got[i].item() == pytest.approx(sum(hs) / len(hs), abs=1e-6), i
    all_positions = prediction_entropy(logits)
    want = [np.mean([_entropy_np(logits[i, t].double().numpy()) for t in range(6)]) for i in range(3)]
    np.testing.assert_allclose(all_positions.numpy(), want, atol=1e-6)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="logits"):
        prediction_entropy(torch.zeros(3))
    with pytest.raises(ValueError, match="mask: shape"):
        prediction_entropy(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence 1 has no position"):
        prediction_entropy(torch.zeros(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="entropies"):
        dawin_lambda(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="n_components"):
        fit_beta_mixture(torch.rand(10), 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_beta_mixture(torch.tensor([0.5, 1.5]), 1)


MIXTURES = [
    ([0.4, 0.6], [(2.0, 8.0), (9.0, 3.0)]),
    ([0.3, 0.4, 0.3], [(2.0, 20.0), (15.0, 15.0), (20.0, 2.0)]),
]


@pytest.mark.parametrize(("weights", "params"), MIXTURES)
def test_em_recovers_a_known_beta_mixture_within_its_sampling_error(weights, params):
    """n = 40 000 draws; each parameter within 5 standard errors of its moment estimate.

    The M-step estimates (a, b) from a component's mean m and variance v (method of moments) on
    n_k ≈ π_k·n draws: SE(m) = sd/√n_k and SE(v) = v·√((κ−1)/n_k) (κ the kurtosis, from scipy). With
    c = a + b = m(1−m)/v − 1, a relative error δv/v moves c by (c+1)/c·δv/v, and a = m·c, b = (1−m)·c add
    δm/m and δm/(1−m). The components barely overlap, so the assignment adds little on top.
    """
    n = 40_000
    torch.manual_seed(0)
    which = torch.multinomial(torch.tensor(weights), n, replacement=True)
    draws = torch.stack([torch.distributions.Beta(a, b).sample((n,)) for a, b in params])
    x = draws[which, torch.arange(n)]
    mix = fit_beta_mixture(x, len(weights))
    for k, ((a, b), pi) in enumerate(zip(params, weights, strict=True)):
        n_k = pi * n
        m, v, _, excess = (float(t) for t in stats.beta.stats(a, b, moments="mvsk"))
        c = a + b
        rel_v = math.sqrt((excess + 2) / n_k)  # κ − 1 = excess kurtosis + 2
        rel_m = math.sqrt(v) / math.sqrt(n_k)
        tol_a = 5 * ((c + 1) / c * rel_v + rel_m / m)
        tol_b = 5 * ((c + 1) / c * rel_v + rel_m / (1 - m))
        assert mix.a[k].item() == pytest.approx(a, rel=tol_a), (k, mix)
        assert mix.b[k].item() == pytest.approx(b, rel=tol_b), (k, mix)
        tol_pi = 5 * math.sqrt(pi * (1 - pi) / n) + 0.005  # binomial SE, + overlap of the components
        assert mix.weights[k].item() == pytest.approx(pi, abs=tol_pi), (k, mix)


def test_assignment_is_the_argmax_of_the_posterior_under_scipys_beta_density():
    torch.manual_seed(3)
    x = torch.cat([torch.distributions.Beta(2.0, 6.0).sample((300,)),
                   torch.distributions.Beta(6.0, 2.0).sample((300,))])
    mix = fit_beta_mixture(x, 2)
    xs = x.double().clamp(1e-4, 1 - 1e-4).numpy()
    dens = np.stack([mix.weights[k].item() * stats.beta.pdf(xs, mix.a[k].item(), mix.b[k].item())
                     for k in range(2)], axis=1)
    np.testing.assert_array_equal(mix.assign(x).numpy(), dens.argmax(1))
    np.testing.assert_allclose(mix.responsibilities(x).numpy(), dens / dens.sum(1, keepdims=True), atol=1e-9)
    assert mix.means[0] < mix.means[1]  # sorted by mean


def test_component_alphas_are_the_mean_lambda_of_each_component_and_one_component_is_the_mean():
    lam = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.85])
    assign = torch.tensor([0, 2, 0, 2, 2])  # component 1 is empty: left out
    alphas, groups = component_alphas(lam, assign)
    assert [g.tolist() for g in groups] == [[0, 2], [1, 3, 4]]
    assert alphas == pytest.approx([0.15, (0.9 + 0.8 + 0.85) / 3])
    one = fit_beta_mixture(lam, 1)
    alphas, groups = component_alphas(lam, one.assign(lam))
    assert alphas == [float(lam.double().mean())] and groups[0].tolist() == list(range(5))


# -- the authors' procedure: k-means initialisation, their EM, each component at its Beta mean --------------
def _paper_em_reference(x: np.ndarray, labels: np.ndarray, k: int, max_iter=1000, tol=1e-4):
    """DaWin's Beta mixture EM written from the formulas, in numpy/scipy: one-hot responsibilities (+10ε) from
    the k-means labels; M-step n_k = Σ_i r_ik + 10ε, π_k = n_k/Σn, m_k = Σ r x/n_k, v_k = Σ r x²/n_k − m_k²
    capped at m_k(1−m_k)/4, + 10ε, c_k = m_k(1−m_k)/(v_k + 1e-10) − 1, a_k = c_k m_k, b_k = c_k(1−m_k);
    E-step r_ik ∝ π_k x^(a−1)(1−x)^(b−1)/B(a, b); stop when the mean log-likelihood moves less than tol."""
    from scipy.special import betaln, logsumexp

    eps = 10 * np.finfo(np.float64).eps

    def m_step(r):
        n = r.sum(0) + eps
        m = (r * x[:, None]).sum(0) / n
        v = np.minimum((r * x[:, None] ** 2).sum(0) / n - m**2, m * (1 - m) / 4) + eps
        c = m * (1 - m) / (v + 1e-10) - 1
        return n / n.sum(), c * m, c * (1 - m)

    pi, a, b = m_step(np.eye(k)[labels] + eps)
    ll, it = -np.inf, 0
    while it < max_iter:
        it += 1
        prev = ll
        joint = np.log(pi) + (a - 1) * np.log(x[:, None]) + (b - 1) * np.log1p(-x[:, None]) - betaln(a, b)
        norm = logsumexp(joint, axis=1)
        ll = norm.mean()
        pi, a, b = m_step(np.exp(joint - norm[:, None]))
        if abs(ll - prev) < tol:
            break
    return pi, a, b, ll, it


def _overlapping(n=3000, seed=0):
    torch.manual_seed(seed)
    parts = [torch.distributions.Beta(2.0, 6.0).sample((n // 2,)), torch.distributions.Beta(6.0, 3.0).sample(
        (n // 3,)), torch.distributions.Beta(30.0, 3.0).sample((n - n // 2 - n // 3,))]
    return torch.cat(parts).double()


def _separated(seed=0):
    torch.manual_seed(seed)
    spec = (((40.0, 400.0), 300), ((200.0, 200.0), 200), ((400.0, 40.0), 100))
    return torch.cat([torch.distributions.Beta(a, b).sample((m,)) for (a, b), m in spec]).double()


def test_paper_em_equals_the_authors_formulas_written_in_the_test():
    """From the same (deliberately poor) initial partition: EM runs many steps on overlapping components."""
    x = _overlapping()
    labels = torch.bucketize(x, torch.tensor([0.3, 0.5], dtype=torch.float64))  # a quantile-free cut
    mix = beta_mixture_em(x, torch.nn.functional.one_hot(labels, 3).double())
    pi, a, b, ll, it = _paper_em_reference(x.numpy(), labels.numpy(), 3)
    assert it > 5 and mix.n_iter == it
    np.testing.assert_allclose(mix.weights.numpy(), pi, rtol=1e-9)
    np.testing.assert_allclose(mix.a.numpy(), a, rtol=1e-9)
    np.testing.assert_allclose(mix.b.numpy(), b, rtol=1e-9)
    assert mix.log_likelihood == pytest.approx(ll, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_gives_scikit_learns_partition_on_separated_values(seed):
    """The same algorithm as sklearn.cluster.KMeans (k-means++ seeding, Lloyd's steps, its tolerance): on
    values with one k-means optimum both end in the same partition (label names aside)."""
    from itertools import permutations

    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    x = _separated(seed)
    mine = kmeans_1d(x, 3, seed=seed).numpy()
    theirs = KMeans(3, n_init=1, random_state=seed).fit(x.numpy().reshape(-1, 1)).labels_
    assert any((np.array(p)[mine] == theirs).all() for p in permutations(range(3)))
    assert sorted(np.bincount(mine).tolist()) == [100, 200, 300]


def test_kmeans_fit_is_the_best_of_its_restarts_and_components_sit_at_their_beta_means():
    """fit_beta_mixture_kmeans against the reference EM run from the k-means labels of seeds 1, 2, 3 (the
    authors' restarts; kmeans_1d itself is checked against scikit-learn above), the best mean log-likelihood
    kept; α_k = a_k/(a_k+b_k) of each component. On overlapping values the restarts end apart."""
    x = _overlapping(900, seed=1)
    fits = [_paper_em_reference(x.numpy(), kmeans_1d(x, 3, seed=1 + r).numpy(), 3) for r in range(3)]
    assert max(f[3] for f in fits) - min(f[3] for f in fits) > 1e-6  # the choice among restarts matters
    pi, a, b, ll, _ = max(fits, key=lambda f: f[3])
    order = np.argsort(a / (a + b))
    mix = fit_beta_mixture_kmeans(x, 3, n_init=3, seed=1)
    np.testing.assert_allclose(mix.a.numpy(), a[order], rtol=1e-6)
    np.testing.assert_allclose(mix.b.numpy(), b[order], rtol=1e-6)
    np.testing.assert_allclose(mix.weights.numpy(), pi[order], rtol=1e-6)
    assignment = mix.assign(x)
    alphas, groups = component_alphas(x, assignment, mix)
    want = {k: a[order][k] / (a[order][k] + b[order][k]) for k in range(3)}
    assert alphas == pytest.approx([want[k] for k in assignment.unique().tolist()], rel=1e-6)
    routed, _ = component_alphas(x, assignment)  # the other procedure's α: the mean of the routed inputs
    assert max(abs(p - q) for p, q in zip(alphas, routed)) > 1e-3
    dens = np.stack([np.log(pi[order][k]) + stats.beta.logpdf(x.numpy(), a[order][k], b[order][k])
                     for k in range(3)], axis=1)
    np.testing.assert_array_equal(assignment.numpy(), dens.argmax(1))


def test_kmeans_fit_with_fewer_distinct_values_than_components():
    x = torch.tensor([0.2, 0.2, 0.7, 0.7, 0.7], dtype=torch.float64)
    mix = fit_beta_mixture_kmeans(x, 3)
    assert len(mix.a) == 2 and mix.means.tolist() == pytest.approx([0.2, 0.7], abs=1e-12)
    one = fit_beta_mixture_kmeans(torch.full((4,), 0.3, dtype=torch.float64), 2)
    assert len(one.a) == 1 and one.means.item() == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match="n_init"):
        fit_beta_mixture_kmeans(x, 2, n_init=0)
