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
