"""WEMoE maths against per-input materialised weights: each input (token or sequence) gets its own matrix."""

import pytest
import torch

from robustft.ops.wemoe import ensembled_linear, routing_weights


def _case(seed=0, k=3, n=4, t=5, d_in=6, d_out=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    wv = torch.randn(k, d_out, d_in, generator=g, dtype=torch.float64)
    bv = torch.randn(k, d_out, generator=g, dtype=torch.float64)
    gate = torch.randn(n, t, k, generator=g, dtype=torch.float64)
    return x, w, b, wv, bv, gate


@pytest.mark.parametrize("with_bias", [True, False])
def test_per_token_routing_equals_one_weight_matrix_per_token(with_bias):
    x, w, b, wv, bv, gate = _case()
    if not with_bias:
        b = bv = None
    got = ensembled_linear(x, w, b, wv, bv, routing_weights(gate, "token"))
    want = torch.empty_like(got)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            r = gate[i, t]
            w_it = w + sum(r[k] * wv[k] for k in range(wv.shape[0]))
            y = w_it @ x[i, t]
            if b is not None:
                y = y + b + sum(r[k] * bv[k] for k in range(wv.shape[0]))
            want[i, t] = y
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_per_sequence_routing_equals_one_weight_matrix_per_sequence_over_the_masked_positions():
    x, w, b, wv, bv, gate = _case(1)
    mask = torch.ones(x.shape[:2], dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    r = routing_weights(gate, "sequence", mask)
    assert r.shape == (x.shape[0], 1, wv.shape[0])
    got = ensembled_linear(x, w, b, wv, bv, r)
    for i in range(x.shape[0]):
        keep = mask[i].bool()
        r_i = gate[i, keep].sum(0) / keep.sum()  # the mean over the sequence's real positions
        w_i = w + sum(r_i[k] * wv[k] for k in range(wv.shape[0]))
        b_i = b + sum(r_i[k] * bv[k] for k in range(wv.shape[0]))
        torch.testing.assert_close(got[i], x[i] @ w_i.T + b_i, rtol=1e-12, atol=1e-12)
    # without a mask every position counts (FusionBench's mean over the sequence)
    torch.testing.assert_close(routing_weights(gate, "sequence"), gate.sum(1, keepdim=True) / gate.shape[1])


def test_bad_shapes_and_options_are_named():
    x, w, b, wv, bv, gate = _case()
    with pytest.raises(ValueError, match="weight_vectors"):
        ensembled_linear(x, w, b, wv[:, :, :-1], bv, gate)
    with pytest.raises(ValueError, match="bias_vectors"):
        ensembled_linear(x, w, b, wv, bv[:2], gate)
    with pytest.raises(ValueError, match="both or neither"):
        ensembled_linear(x, w, b, wv, None, gate)
    with pytest.raises(ValueError, match="routing"):
        ensembled_linear(x, w, b, wv, bv, gate[..., :2])
    with pytest.raises(ValueError, match="routing"):
        routing_weights(gate, "batch")
    with pytest.raises(ValueError, match="mask"):
        routing_weights(gate, "sequence", torch.ones(4, 4))
    with pytest.raises(ValueError, match="all masked"):
        routing_weights(gate, "sequence", torch.zeros(gate.shape[:2]))
