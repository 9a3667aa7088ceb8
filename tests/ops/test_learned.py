"""Block assignment and the composed θ of learned coefficients against hand-written expectations."""

import pytest
import torch

from robustft.ops.learned import assign_blocks, compose_weights, task_vectors

NAMES = ["emb.weight", "layer.0.a.weight", "layer.0.b.bias", "layer.1.a.weight", "head.weight",
         "layer.10.a.w"]


def test_assign_blocks_named_and_regex():
    assert assign_blocks(NAMES, "tensor") == (NAMES, [0, 1, 2, 3, 4, 5])
    assert assign_blocks(NAMES, "all") == (["all"], [0] * 6)
    layer = (["emb.weight", "0", "1", "head.weight", "10"], [0, 1, 1, 2, 3, 4])
    assert assign_blocks(NAMES, "layer") == layer
    # a regex without a group: the whole match is the key; unmatched tensors are blocks of their own
    regex = (["weight", "layer.0.b.bias", "layer.10.a.w"], [0, 0, 1, 0, 0, 2])
    assert assign_blocks(NAMES, r"weight$") == regex


@pytest.mark.parametrize("blocks", ["", "(", 3])
def test_assign_blocks_bad_option_is_named(blocks):
    with pytest.raises(ValueError, match="blocks"):
        assign_blocks(NAMES, blocks)


def test_compose_equals_dense_formula_for_several_task_vectors_per_block():
    g = torch.Generator().manual_seed(0)
    shapes = {"emb.weight": (5, 3), "layer.0.a.weight": (3, 3), "layer.0.b.bias": (3,),
              "layer.1.a.weight": (3, 2)}
    start = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ends = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]
    taus = task_vectors(start, ends)
    blocks, index = assign_blocks(list(start), "layer")
    coef = torch.randn(3, len(blocks), generator=g)
    got = compose_weights(start, taus, coef, index)
    block_of = {"emb.weight": 0, "layer.0.a.weight": 1, "layer.0.b.bias": 1, "layer.1.a.weight": 2}
    for n in shapes:  # θ = θ_0 + Σ_k α_{k,b(n)} (θ_k − θ_0), written out
        want = start[n] + sum(coef[k, block_of[n]] * (ends[k][n] - start[n]) for k in range(3))
        torch.testing.assert_close(got[n], want)


def test_compose_is_differentiable_in_the_coefficients():
    start = {"w": torch.zeros(2), "v": torch.zeros(3)}
    taus = [{"w": torch.ones(2), "v": 2 * torch.ones(3)}]
    coef = torch.zeros(1, 2, requires_grad=True)
    theta = compose_weights(start, taus, coef, [0, 1])
    (theta["w"].sum() + theta["v"].sum()).backward()
    torch.testing.assert_close(coef.grad, torch.tensor([[2.0, 6.0]]))  # <1, τ_b> per block


def test_bad_inputs_are_named():
    start = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="none given"):
        task_vectors(start, [])
    with pytest.raises(ValueError, match=r"task vector 0, tensor 'w': shape \(3,\)"):
        task_vectors(start, [{"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="missing"):
        task_vectors(start, [{"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="coefficients"):
        compose_weights(start, [{"w": torch.ones(2)}], torch.zeros(2, 1), [0])
    with pytest.raises(ValueError, match="block_index"):
        compose_weights(start, [{"w": torch.ones(2)}], torch.zeros(1, 1), [1])
