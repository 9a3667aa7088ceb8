"""``robustft warp`` / ``warp_checkpoints``: WARP's spherical merge of M policies then LITI toward the init,
written streamed by the merge engine; the output equals the dense formula."""

from __future__ import annotations

import math

import pytest
import torch

from robustft.cli import main
from robustft.merge import warp_checkpoints
from tests.merge.tiny_models import build_family, load_all


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("warp"), n=3, max_shard_size="20KB", tokenizer=False)


def _dense_slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """WARP stage 2 on flattened float64 task vectors (the reference: no robustft code)."""
    fa, fb = a.double().reshape(-1), b.double().reshape(-1)
    om = math.acos((fa @ fb / (fa.norm() * fb.norm())).item())
    return ((math.sin((1 - lam) * om) * fa + math.sin(lam * om) * fb) / math.sin(om)).reshape(a.shape)


def _dense_next_init(init, policies, eta, weights):
    """θ_next = (1−η) θ_init + η θ_merged, θ_merged = θ_init + iterated SLERP (λ_m = w_m / Σ_{k≤m} w_k)."""
    out = {}
    for name, b in init.items():
        deltas = [p[name].double() - b.double() for p in policies]
        merged, total = deltas[0], weights[0]
        for d, w in zip(deltas[1:], weights[1:], strict=True):
            total += w
            merged = _dense_slerp(merged, d, w / total)
        out[name] = (1 - eta) * b.double() + eta * (b.double() + merged)
    return out


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_cli_writes_the_dense_liti_of_the_iterated_slerp(family, tmp_path, weights):
    init_dir, dirs = family
    out = tmp_path / "next"
    args = ["warp", "--init", str(init_dir), "--policies", *map(str, dirs), "--eta", "0.3", "--out", str(out)]
    if weights:
        args += ["--weights", *map(str, weights)]
    assert main([*args, "--no-progress"]) == 0
    got = load_all(out)
    ref = _dense_next_init(load_all(init_dir), [load_all(d) for d in dirs], 0.3, weights or [1.0] * 3)
    assert set(got) == set(ref) and (out / "config.json").is_file()
    for name, r in ref.items():
        torch.testing.assert_close(got[name].double(), r, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["warp", "ties"])
def test_function_is_the_method_then_lerp_toward_the_init(family, tmp_path, method):
    """warp_checkpoints(method, η) = lerp(θ_init, θ_merged, η) with θ_merged the recipe at lambda 1."""
    init_dir, dirs = family
    warp_checkpoints(init_dir, dirs, tmp_path / "full", 1.0, method=method)
    warp_checkpoints(init_dir, dirs, tmp_path / "liti", 0.25, method=method)
    init, merged, got = load_all(init_dir), load_all(tmp_path / "full"), load_all(tmp_path / "liti")
    for name, b in init.items():
        torch.testing.assert_close(got[name], torch.lerp(b, merged[name], 0.25), rtol=1e-6, atol=1e-7)


def test_bad_options_are_refused_before_writing(family, tmp_path, capsys):
    init_dir, dirs = family
    out = tmp_path / "x"
    base = ["warp", "--init", str(init_dir), "--policies", *map(str, dirs), "--out", str(out)]
    assert main([*base, "--eta", "1.5"]) == 2 and "extrapolat" in capsys.readouterr().err
    assert (
        main([*base, "--eta", "0.5", "--method", "linear"]) == 2 and "no lambda" in capsys.readouterr().err
    )
    assert main([*base, "--eta", "0.5", "--weights", "1"]) == 2 and "weights" in capsys.readouterr().err
    assert (
        main([*base, "--eta", "0.5", "--method", "nuslerp"]) == 2 and "no lambda" in capsys.readouterr().err
    )
    assert not out.exists()
    inside = ["warp", "--init", str(init_dir), "--policies", *map(str, dirs), "--eta", "0.5"]
    assert main([*inside, "--out", str(dirs[1] / "next")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft warp: error: output ") and "input" in err, err


def test_lambda_without_a_base_is_refused():
    """Without base_model the spherical methods merge the weights (mergekit); λ (LITI's η) needs the init."""
    from robustft.merge import parse_recipe

    data = {"merge_method": "warp", "models": ["a", "b"]}
    assert parse_recipe(data).base_model is None
    with pytest.raises(ValueError, match="lambda .* needs base_model"):
        parse_recipe({**data, "parameters": {"lambda": 0.5}})


def test_recipe_with_lambda_eta_is_the_same_step_as_warp(family, tmp_path):
    """docs/alignment.md: a ``robustft merge`` recipe (``merge_method: warp``, ``lambda: η``) is "the same
    step" as ``robustft warp --eta η``: both outputs hold the same tensors, both the dense formula."""
    import yaml

    init_dir, dirs = family
    recipe = tmp_path / "warp.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "warp", "base_model": str(init_dir),
                                      "models": [str(d) for d in dirs], "parameters": {"lambda": 0.3}}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "recipe"), "--no-progress"]) == 0
    assert main(["warp", "--init", str(init_dir), "--policies", *map(str, dirs), "--eta", "0.3",
                 "--out", str(tmp_path / "warp"), "--no-progress"]) == 0
    by_recipe, by_warp = load_all(tmp_path / "recipe"), load_all(tmp_path / "warp")
    ref = _dense_next_init(load_all(init_dir), [load_all(d) for d in dirs], 0.3, [1.0] * 3)
    assert set(by_recipe) == set(by_warp) == set(ref)
    for name, r in ref.items():
        torch.testing.assert_close(by_recipe[name], by_warp[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(by_recipe[name].double(), r, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("weights", [["-1", "2"], ["0", "0"], ["-1", "1"], ["2", "-2"]])
def test_weights_that_extrapolate_or_sum_to_zero_are_refused(family, tmp_path, capsys, weights):
    """-1 2 is slerp at λ = 2 (an extrapolation: needs --extrapolate); 0 0 and -1 1 have no shares at all
    (λ = w/0; the iterated SLERP would silently take 1/2): refused even with --extrapolate. None writes."""
    init_dir, dirs = family
    out = tmp_path / "x"
    base = ["warp", "--init", str(init_dir), "--policies", *map(str, dirs[:2]), "--eta", "0.5",
            "--out", str(out), "--weights", *weights, "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft warp: error: weights: "), err
    assert ("--extrapolate" in err) == (weights == ["-1", "2"]), err
    if weights != ["-1", "2"]:
        assert main([*base, "--extrapolate"]) == 2 and "sum to 0" in capsys.readouterr().err
    assert not out.exists()


def test_negative_weights_with_extrapolate_are_the_dense_formula(family, tmp_path):
    init_dir, dirs = family
    out = tmp_path / "next"
    args = ["warp", "--init", str(init_dir), "--policies", *map(str, dirs[:2]), "--eta", "0.5",
            "--out", str(out), "--weights", "-1", "2", "--extrapolate", "--no-progress"]
    assert main(args) == 0
    got = load_all(out)
    ref = _dense_next_init(load_all(init_dir), [load_all(d) for d in dirs[:2]], 0.5, [-1.0, 2.0])
    for name, r in ref.items():
        torch.testing.assert_close(got[name].double(), r, rtol=0, atol=1e-6, msg=name)
