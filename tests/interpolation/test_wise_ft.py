import json
import math

import pytest
import torch

from robustft.interpolation.wise_ft import WiseFTCurve, interpolate_state_dicts


def test_choose_alpha_uses_only_what_it_is_given_and_breaks_ties_on_loss():
    from robustft.interpolation.wise_ft import choose_alpha

    alphas = [0.0, 0.5, 0.7, 1.0]
    assert choose_alpha(alphas, [0.6, 0.9, 0.9, 0.8]) == 0.5  # tie, no loss: smallest α
    assert choose_alpha(alphas, [0.6, 0.9, 0.9, 0.8], tie_break=[1.0, 0.3, 0.2, 0.1]) == 0.7
    assert choose_alpha(alphas, [0.6, 0.9, 0.8, 0.8], tie_break=[1.0, 0.3, 0.2, 0.1]) == 0.5  # no tie
    assert choose_alpha(alphas, [3.0, 1.0, 2.0, 1.0], greater_is_better=False) == 0.5
    with pytest.raises(ValueError, match="tie-break"):
        choose_alpha(alphas, [1, 2, 3, 4], tie_break=[1])


def test_state_dicts_keep_integer_tensors_and_name_mismatches():
    s = {"w": torch.zeros(2), "n": torch.tensor([3])}
    e = {"w": torch.ones(2), "n": torch.tensor([3])}
    out = interpolate_state_dicts(s, e, 0.25)
    torch.testing.assert_close(out["w"], torch.full((2,), 0.25))
    assert torch.equal(out["n"], torch.tensor([3]))
    with pytest.raises(ValueError, match="'n'.*differ"):
        interpolate_state_dicts(s, {"w": e["w"], "n": torch.tensor([4])}, 0.5)
    with pytest.raises(ValueError, match="only in start \\['n'\\]"):
        interpolate_state_dicts(s, {"w": e["w"]}, 0.5)


def test_curve_files(tmp_path):
    curve = WiseFTCurve(
        alphas=[0.0, 0.5, 1.0],
        results={"id": [0.5, 0.9, 0.8], "ood": [0.7, 0.6, 0.3]},
        metric="accuracy",
        id_dataset="id",
        chosen_alpha=0.5,
    )
    paths = curve.save(tmp_path)
    assert [p.name for p in paths] == ["wise_ft.json", "wise_ft.csv", "wise_ft.png"]
    rows = (tmp_path / "wise_ft.csv").read_text().splitlines()
    assert rows[0] == "alpha,id_accuracy,ood_accuracy,chosen" and rows[2] == "0.5,0.9,0.6,1"
    table = curve.table()
    assert "start" in table and "fine-tuned" in table and "<- chosen on id" in table


# -- α under a budget ----------------------------------------------------------------------------
def _brute_force(alphas, ids, cons, eps, rel, greater_id, greater_cons):
    """The budget rule by enumeration: admitted α (constraint within α=0's + slack), best ID, smallest α."""
    base = cons[alphas.index(0.0)]
    slack = eps + rel * abs(base)
    admitted = [i for i in range(len(alphas))
                if (cons[i] >= base - slack if greater_cons else cons[i] <= base + slack)]
    key = (lambda i: -ids[i]) if greater_id else (lambda i: ids[i])
    best = min(key(i) for i in admitted)
    return min(alphas[i] for i in admitted if key(i) == best)


def test_budget_rule_equals_brute_force_on_synthetic_curves():
    from robustft.interpolation.wise_ft import AlphaBudget, choose_alpha

    alphas, binding = [i / 10 for i in range(11)], 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 6, (11,), generator=g).double().div(4).tolist()  # coarse: ties happen
        cons = torch.rand(11, generator=g).double().tolist()
        eps, rel = float(torch.rand(1, generator=g)) * 0.4, float(torch.rand(1, generator=g)) * 0.3
        greater_id, greater_cons = bool(seed % 2), bool(seed % 3 == 0)
        budget = AlphaBudget("retained", "loss", epsilon=eps, relative=rel, greater_is_better=greater_cons)
        got = choose_alpha(alphas, ids, greater_id, constraint=cons, budget=budget)
        assert got == _brute_force(alphas, ids, cons, eps, rel, greater_id, greater_cons), seed
        id_rule = choose_alpha(alphas, ids, greater_id)  # the default: the ID rule, i.e. an infinite budget
        assert id_rule == _brute_force(alphas, ids, cons, math.inf, 0, greater_id, False), seed
        binding += got != id_rule
    assert 5 <= binding < 40  # the budget changed the choice on some curves (9 of 40), not all


def test_budget_admits_nothing_with_a_finite_metric_warns_and_chooses_the_start():
    from robustft.interpolation.wise_ft import AlphaBudget, choose_alpha

    budget = AlphaBudget("retained", epsilon=0.1)
    with pytest.warns(RuntimeWarning, match=r"retained loss <= value at alpha=0 \+ 0.1 \(= 0.6\).*"
                                            r"smallest violation is 0.2 \(at α=\[0.5\]\)"):
        assert choose_alpha([0.0, 0.5, 1.0], [float("nan"), 0.9, 0.8], constraint=[0.5, 0.8, 1.2],
                            budget=budget) == 0.0


def test_budget_needs_the_start_and_checks_its_fields():
    from robustft.interpolation.wise_ft import AlphaBudget, check_budget, choose_alpha

    with pytest.raises(ValueError, match="lacks; add 0"):
        choose_alpha([0.5, 1.0], [1, 2], constraint=[1, 2], budget=AlphaBudget("r"))
    with pytest.raises(ValueError, match="at α=0 is nan"):
        choose_alpha([0.0, 1.0], [1, 2], constraint=[float("nan"), 2], budget=AlphaBudget("r"))
    with pytest.raises(ValueError, match="both a budget and its constraint"):
        choose_alpha([0.0, 1.0], [1, 2], budget=AlphaBudget("r"))
    with pytest.raises(ValueError, match="budget.epsilon"):
        AlphaBudget("r", epsilon=-0.1)
    with pytest.raises(ValueError, match="budget.dataset: 'r' is not one of"):
        check_budget({"dataset": "r"}, {"id": 0}, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"unknown keys \['eps'\]"):
        check_budget({"dataset": "id", "eps": 1}, {"id": 0}, [0.0, 1.0])
    assert AlphaBudget.of({"dataset": "id", "metric": "eval_kl"}).metric == "kl"


def test_curve_with_a_budget_records_the_rule_and_plots_the_constraint(tmp_path):
    from robustft.interpolation.wise_ft import AlphaBudget

    budget = AlphaBudget("retained", "loss", epsilon=0.25)
    curve = WiseFTCurve(alphas=[0.0, 0.5, 1.0], results={"id": [2.0, 1.2, 1.0], "retained": [0.5, 0.7, 1.5]},
                        metric="loss", id_dataset="id", chosen_alpha=0.0, greater_is_better=False)
    assert curve.choose() == 1.0 and curve.rule == "id"
    assert curve.choose(budget) == 0.5  # 1.5 > 0.5 + 0.25
    curve.budget, curve.constraint, curve.chosen_alpha = budget, [0.5, 0.7, 1.5], 0.5
    curve.extra["id_rule_alpha"] = 1.0
    curve.save(tmp_path)
    rows = (tmp_path / "wise_ft.csv").read_text().splitlines()
    assert rows[0] == "alpha,id_loss,retained_loss,chosen,budget_retained_loss,admitted"
    assert rows[3] == "1.0,1.0,1.5,0,1.5,0"
    saved = json.loads((tmp_path / "wise_ft.json").read_text())
    assert saved["rule"] == "budget" and saved["budget_limit"] == 0.75
    assert saved["budget"] == {"dataset": "retained", "metric": "loss", "epsilon": 0.25, "relative": 0.0,
                               "greater_is_better": False}
    table = curve.table()
    rule = "rule: best id loss subject to retained loss <= value at alpha=0 + 0.25 (= 0.75)"
    assert table.splitlines()[0] == rule
    assert "over budget" in table.splitlines()[-1] and "under the budget" in table
    from PIL import Image

    assert Image.open(tmp_path / "wise_ft.png").size[0] > 1000  # two panels side by side
