"""ops/sparse.py against brute force: the global top-k mask, gradient masking, keeping frozen entries."""

import pytest
import torch

from robustft.ops.sparse import keep_masked_, magnitude_scores, mask_gradient, top_k_masks


def _brute_top_k(scores, density):
    """The k largest (score, tensor, flat index) by a plain Python sort over every entry of every tensor."""
    entries = [(float(v), n, i) for n, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist())]
    k = max(1, round(density * len(entries)))
    return {(name, i) for _, name, i in sorted(entries, key=lambda e: -e[0])[:k]}


@pytest.mark.parametrize("density", [0.003, 0.1, 0.5, 1.0])
def test_top_k_mask_equals_a_brute_force_sort(density):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 5, generator=g), "b": 2 * torch.rand(13, generator=g),
              "c": torch.rand(3, 2, 2, generator=g)}
    masks = top_k_masks(scores, density)
    got = {(n, i) for n, m in masks.items() for i in m.reshape(-1).nonzero().squeeze(1).tolist()}
    assert got == _brute_top_k(scores, density)
    assert all(masks[n].shape == scores[n].shape and masks[n].dtype == torch.bool for n in scores)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True])
def test_top_k_mask_refuses_a_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        top_k_masks({"a": torch.rand(4)}, density)


def test_top_k_mask_names_a_non_finite_score():
    with pytest.raises(ValueError, match="'b'"):
        top_k_masks({"a": torch.rand(4), "b": torch.tensor([1.0, float("nan")])}, 0.5)


def test_magnitude_scores_are_absolute_values():
    w = torch.randn(4, 3)
    assert torch.equal(magnitude_scores({"w": w})["w"], w.abs())


def test_mask_gradient_zeroes_masked_entries_even_non_finite():
    g = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    m = torch.tensor([True, False, False, True])
    assert torch.equal(mask_gradient(g, m), torch.tensor([1.0, 0.0, 0.0, -2.0]))
    assert torch.equal(mask_gradient(g, torch.tensor(False)), torch.zeros(4))  # a whole tensor frozen


def test_keep_masked_restores_masked_entries_bit_for_bit():
    before = torch.tensor([-0.0, 1e-30, 3.0, 4.0])
    w = before * 0.9 + 1.0  # an update moved every entry
    moved = w.clone()
    m = torch.tensor([False, False, True, False])
    keep_masked_(w, before, m)
    assert torch.equal(w.view(torch.int32)[~m], before.view(torch.int32)[~m])  # -0.0 stays -0.0
    assert torch.equal(w[m], moved[m])
    keep_masked_(w, before, torch.tensor(False))
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))


def test_top_k_masks_break_ties_to_the_lowest_index_across_tensors():
    """Ties at the cut go to the lowest flat index, tensors taken in the mapping's order (the one exact
    top-k of the package, robustft.ops.merge.top_k_mask), whatever torch.topk's own order is."""
    scores = {"a": torch.zeros(600), "b": torch.cat([torch.ones(3), torch.zeros(997)])}
    masks = top_k_masks(scores, 10 / 1600)
    assert masks["b"][:3].all() and masks["b"][3:].sum() == 0
    assert masks["a"][:7].all() and masks["a"][7:].sum() == 0
