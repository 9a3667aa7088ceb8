"""The loss-barrier report (analysis/barrier.py): curves against a brute-force loop that loads each θ(λ) into
a copy of the model, the barrier of a permuted copy of A is 0 after alignment, the files are written."""

import json

import pytest
import torch

from robustft.analysis.barrier import barrier_report, loss_along_path
from robustft.merge.align import permutation_spec
from robustft.ops.rebasin import apply_permutations


def _mlp(seed):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _ce(out, batch):
    return torch.nn.functional.cross_entropy(out, batch[1])


def _brute(a, b, x, y, lambdas):
    """Load (1−λ)A + λB into a fresh copy, run it, and take the chord from the end losses by hand."""
    model, sa, sb = _mlp(9), a.state_dict(), b.state_dict()
    losses = []
    for t in lambdas:
        model.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] for k in sa})
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(model(x), y).item())
    return losses, max(v - ((1 - t) * losses[0] + t * losses[-1]) for t, v in zip(lambdas, losses))


def test_curves_and_barriers_equal_brute_force(tmp_path):
    a, b = _mlp(0), _mlp(1)
    x, y = _data()
    lambdas = [0.0, 0.2, 0.5, 0.7, 1.0]
    report = barrier_report(a, b, (x, y), lambdas=lambdas, loss_fn=_ce)
    assert list(report.curves) == ["unaligned", "weight matching", "activation matching"]
    losses, barrier = _brute(a, b, x, y, lambdas)
    assert report.curves["unaligned"] == pytest.approx(losses, rel=1e-6)
    assert report.barriers["unaligned"] == pytest.approx(barrier, rel=1e-6, abs=1e-7)
    for name in ("weight matching", "activation matching"):  # same end points: aligned B is B's function
        assert report.curves[name][0] == pytest.approx(losses[0], rel=1e-6)
        assert report.curves[name][-1] == pytest.approx(losses[-1], rel=1e-5)
    paths = report.save(tmp_path)
    assert {p.suffix for p in paths} >= {".json", ".csv"}
    assert json.loads((tmp_path / "barrier.json").read_text())["barriers"] == report.barriers
    assert "activation matching" in report.table()


def test_a_permuted_copy_has_no_barrier_after_alignment():
    a = _mlp(0)
    sd = a.state_dict()
    spec = permutation_spec({k: tuple(v.shape) for k, v in sd.items()})
    g = torch.Generator().manual_seed(2)
    b = _mlp(0)
    shuffle = {k: torch.randperm(n, generator=g) for k, n in spec.sizes.items()}
    b.load_state_dict(apply_permutations(spec, shuffle, sd))
    x, y = _data()
    report = barrier_report(a, b, (x, y), loss_fn=_ce)
    assert report.barriers["unaligned"] > 0.01
    for name in ("weight matching", "activation matching"):
        assert report.barriers[name] == pytest.approx(0.0, abs=1e-6)
        assert report.moved[name] > 0


def test_bad_options_are_named():
    a, b = _mlp(0), _mlp(1)
    x, y = _data()
    with pytest.raises(ValueError, match="lambdas: must include 0 and 1"):
        barrier_report(a, b, (x, y), lambdas=[0.0, 0.5], loss_fn=_ce)
    with pytest.raises(ValueError, match="methods"):
        barrier_report(a, b, (x, y), methods=["sinkhorn"], loss_fn=_ce)
    with pytest.raises(ValueError, match="scalar"):
        loss_along_path(a, a.state_dict(), b.state_dict(), (x, y), [0.0, 1.0], lambda out, batch: out)


@pytest.mark.slow  # trains two MLPs (~6 s quiet)
def test_both_alignments_lower_the_barrier_of_two_independently_trained_mlps(tmp_path):
    """The toy task of tests/merge/test_align.py (3 spirals, MLPs 2-64-64-3 from different seeds); the
    report's numbers are printed (docs/merging.md quotes them); only the direction is asserted."""
    from tests.merge.tiny_models import spirals, train_mlp

    x, label = spirals()
    a, b = train_mlp(1, x, label), train_mlp(2, x, label)
    report = barrier_report(a, b, (x, label), lambdas=[i / 20 for i in range(21)], loss_fn=_ce)
    print("\n" + report.table())
    report.save(tmp_path)
    assert report.barriers["weight matching"] < report.barriers["unaligned"]
    assert report.barriers["activation matching"] < report.barriers["unaligned"]
