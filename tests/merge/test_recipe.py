"""Recipe validation: defaults and precedence, and every malformed option named in the error."""

import pytest
import torch

from robustft.cli import main
from robustft.merge import METHODS, load_recipe, merge_tensor, parse_recipe
from robustft.merge.registry import REQUIRED


def _data(**extra):
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": ["m1", {"model": "m2", "parameters": {"density": 0.7}}],
    }
    data.update(extra)
    return data


def test_precedence_defaults_recipe_model_override():
    r = parse_recipe(
        _data(parameters={"density": 0.4, "lambda": 0.5},
              overrides=[{"pattern": "mlp", "parameters": {"density": 0.9}},
                         {"pattern": "x", "merge_method": "base"}],
              dtype="bfloat16", seed=3)
    )  # fmt: skip
    method, g, m = r.resolve()
    assert method == "ties" and g == {"lambda": 0.5, "normalize": True, "rescale": False, "int8_mask": False}
    assert m == [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.7}]
    assert r.resolve(r.overrides[0])[2] == [{"weight": 1.0, "density": 0.9}] * 2
    assert r.resolve(r.overrides[1])[0] == "base"
    assert r.dtype == torch.bfloat16 and r.seed == 3
    # mergekit's default density: 1.0, keep everything
    assert parse_recipe(_data()).resolve()[2][0]["density"] == 1.0


@pytest.mark.parametrize(
    "data,match",
    [
        ([1, 2], "expected a YAML mapping"),
        ({"models": ["a"]}, "merge_method is required"),
        (_data(merge_method="frankenmerge"), "unknown merge method 'frankenmerge'"),
        (_data(merge_method="base"), "only meaningful in overrides"),
        (_data(parameters={"densty": 0.5}), "unknown parameter 'densty' for merge_method 'ties'"),
        (
            _data(models=[{"model": "m", "parameters": {"lamda": 2}}]),
            r"models\[0\].parameters: unknown parameter 'lamda'",
        ),
        (_data(models=[{"model": "m", "weights": 1}]), r"models\[0\]: unknown option"),
        (_data(parameters={"density": 1.5}), "density must be in \\[0, 1\\]"),
        (
            _data(merge_method="dare_linear", models=["m"], parameters={"drop_rate": 1.0}),
            "drop_rate must be in \\[0, 1\\)",
        ),
        (_data(parameters={"weight": "heavy"}), "weight must be a finite number"),
        (_data(dtype="float17"), "dtype"),
        (_data(dtype="int8"), "floating dtype"),
        (_data(seed=1.5), "seed must be an integer"),
        (_data(overrides=[{"pattern": "("}]), r"overrides\[0\].pattern"),
        (
            _data(overrides=[{"pattern": "a", "merge_method": "slerp", "parameters": {"densty": 1}}]),
            "for merge_method 'slerp'",
        ),
        (_data(models=["b", "m", "b"]), "base_model 'b' is listed 2 times under models"),
        (_data(merge_method="model_stock", models=["m"]), "at least 2 model"),
        (_data(max_shard_size="big"), "max_shard_size"),
        (
            _data(
                merge_method="linear",
                base_model=None,
                models=[
                    {"model": "a", "parameters": {"weight": 1}},
                    {"model": "c", "parameters": {"weight": -1}},
                ],
            ),
            "non-zero sum",
        ),
        (_data(colour="red"), r"unknown option\(s\) \['colour'\]"),
        (_data(merge_method=["ties"]), r"merge_method: expected a method name \(a string\), got \['ties'\]"),
        (
            _data(overrides=[{"pattern": "a", "merge_method": {"x": 1}}]),
            r"overrides\[0\].merge_method: expected a method name",
        ),
        (_data(parameters={"density": float("nan")}), "density must be a finite number, got nan"),
        (_data(parameters={"lambda": float("inf")}), "lambda must be a finite number, got inf"),
        (
            _data(merge_method="slerp", models=["m"], parameters={"t": 1.5}),
            r"parameters.t=1.5 is outside \[0, 1\].*extrapolate",
        ),
        (
            _data(merge_method="breadcrumbs", models=["m"], parameters={"beta": 0.1, "gamma": 0.6}),
            r"parameter 'beta' is refused for 'breadcrumbs': .*gamma = the fraction of largest",
        ),
        (
            _data(merge_method="dare_ties", models=[{"model": "m", "parameters": {"drop_rate": 0.5}}],
                  parameters={"density": 0.5}),
            r"give density .* or drop_rate .*, not both",
        ),
        (
            _data(merge_method="della_linear", models=["m"], parameters={"density": 0.5, "epsilon": 0.5}),
            r"models\[0\] density \+/- epsilon must lie in \(0, 1\)",
        ),
        (_data(merge_method="nearswap", models=["m"]), r"merge_method 'nearswap' needs parameter 't'"),
        (_data(merge_method="nearswap", models=["m"], parameters={"t": -1}), r"parameters.t must be >= 0"),
        (_data(merge_method="arcee_fusion", models=["m", "n"]), "at most 1 model"),
        (
            _data(merge_method="sce", models=["m"], parameters={"select_topk": 1.5}),
            r"select_topk must be in \[0, 1\]",
        ),
        (_data(merge_method="ram", models=["m"], parameters={"epsilon": -1}), "epsilon must be >= 0"),
        (
            _data(merge_method="breadcrumbs_ties", parameters={"gamma": 1.5}),
            r"parameters.gamma must be in \[0, 1\]",
        ),
        (
            _data(models=["m1", "m2"], merge_method="tsv_m", parameters={"sv_reduction": 0.6}),
            r"sv_reduction x number of models must be <= 1 .* got 0.6 x 2",
        ),
        (
            _data(models=["m1", "m2"], merge_method="tsv_m", parameters={"sv_reduction": 0}),
            r"parameters.sv_reduction must be in \(0, 1\]",
        ),
        (
            _data(models=["m1", "m2"], merge_method="tsv_m", parameters={"alpha": float("nan")}),
            "parameters.alpha",
        ),
        (
            _data(models=["m1", "m2"], merge_method="tsv_m", parameters={"lamda": 1.0}),
            "unknown parameter 'lamda' for merge_method 'tsv_m'",
        ),
        (
            _data(models=["m1", "m2"], merge_method="iso_cts", parameters={"common_space_fraction": 1.5}),
            r"parameters.common_space_fraction must be in \[0, 1\]",
        ),
        (_data(merge_method="iso_c", models=["m"], base_model=None), "merge_method 'iso_c' needs base_model"),
    ],
)
def test_bad_recipes_name_the_option(data, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(data)


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_recipe(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("merge_method: linear\nmodels: [a, b]\n")
    assert load_recipe(ok).reference_model == "a"


REQUIRED_VALUES = {"density": 0.5, "t": 0.05}


def test_every_registered_method_is_parsed_and_merged_by_the_engine():
    """The registry is the one list: each method parses from a recipe with its defaults and runs in the
    engine's merge_tensor on a small tensor (finite result, the tensor's shape)."""
    g = torch.Generator().manual_seed(0)
    for name, spec in METHODS.items():
        if name == "base":
            continue
        n = max(spec.min_models, 2 if spec.max_models is None else 1)
        if spec.base_input:  # the base is one more input (mergekit): passthrough takes it alone
            n = 2 if spec.max_models is None else spec.max_models - 1
        stats = {"fisher": "fisher", "regmean": "gram"}.get(name)  # the per-model statistics file
        own = [{stats: f"s{i}"} if stats else {} for i in range(n)]
        models = [{"model": f"m{i}", "parameters": p} for i, p in enumerate(own)]
        if not models:  # the base alone (passthrough): mergekit lists it under models
            models = [{"model": "b"}]
        # values for the parameters without a default (other than the statistics paths above)
        required = {k: REQUIRED_VALUES[k] for k, p in {**spec.global_params, **spec.model_params}.items()
                    if p.default is REQUIRED and k != stats}  # fmt: skip
        if spec.base_input and "weight" in spec.model_params:  # the base's weight has no default
            required["weight"] = 1.0
        recipe = parse_recipe(
            {"merge_method": name, "base_model": "b", "models": models, "parameters": required}
        )
        method, gparams, mparams = recipe.resolve()
        assert method == name and set(gparams) == set(spec.global_params)
        assert all(set(p) == set(spec.model_params) for p in mparams)
        base = torch.randn(4, 5, generator=g)
        tensors = [base + 0.1 * torch.randn(4, 5, generator=g) for _ in range(n)]
        fishers = [torch.rand(4, 5, generator=g) for _ in range(n)] if name == "fisher" else None
        if name == "regmean":  # input Grams (5, 5) of the (4, 5) weights: positive definite
            fishers = [(x := torch.randn(8, 5, generator=g)).T @ x for _ in range(n)]
        out = merge_tensor(name, base.clone(), [t.clone() for t in tensors], gparams, mparams, 3, fishers)
        assert out.shape == base.shape and bool(out.isfinite().all()), name


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_interpolation_methods_extrapolate_only_when_asked(method):
    data = {"merge_method": method, "base_model": "b", "models": ["m"], "parameters": {"t": 1.5}}
    with pytest.raises(ValueError, match="extrapolate"):
        parse_recipe(data)
    recipe = parse_recipe({**data, "parameters": {"t": 1.5, "extrapolate": True}})
    _, gparams, mparams = recipe.resolve()
    base, end = torch.randn(6), torch.randn(6)
    got = merge_tensor(method, base, [end], gparams, mparams)
    if method == "lerp":  # the dense formula
        torch.testing.assert_close(got, -0.5 * base + 1.5 * end)
    else:  # the angle keeps growing past the end: |θ(1.5)| on the great circle of two unit vectors
        b, e = base / base.norm(), end / end.norm()
        torch.testing.assert_close(merge_tensor(method, b, [e], gparams, mparams).norm(), torch.tensor(1.0))


def test_merge_list_prints_the_registry(capsys):
    """``robustft merge --list``: every registered method with its inputs and each parameter's default."""
    assert main(["merge", "--list"]) == 0
    text = capsys.readouterr().out
    blocks = {b.split("  (")[0]: b for b in ("\n" + text).split("\n") if b and not b.startswith(" ")}
    assert set(blocks) == set(METHODS)
    lines = text.splitlines()
    for name, spec in METHODS.items():
        head = blocks[name]
        assert ("needs base_model" in head) == spec.needs_base, head
        assert f"LoRA deltas: {'yes' if spec.lora else 'no'}" in head
        assert ("on task vectors" in head) == spec.delta
        start = lines.index(head)
        body = []
        for line in lines[start + 1 :]:
            if not line.startswith(" "):
                break
            body.append(line)
        for key, param in {**spec.global_params, **spec.model_params}.items():
            shown = "required" if param.default is REQUIRED else str(param.default)
            assert any(f"{key}={shown}".lower() in line.lower() for line in body), (name, key, body)


def test_merge_without_recipe_is_an_error(capsys):
    assert main(["merge", "--out", "x"]) == 2
    assert "give a RECIPE and --out DIR" in capsys.readouterr().err


def test_gradient_precedence_recipe_slice_source_override():
    """default < recipe < slice < source (evaluated at the tensor's position) < a matching override."""
    r = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "parameters": {
                "density": 0.3,
                "weight": [0, 1],
                "lambda": [{"filter": "mlp", "value": [1, 0.5]}],
            },
            "slices": [
                {
                    "sources": [
                        {"model": "b", "layer_range": [0, 3]},
                        {
                            "model": "m",
                            "layer_range": [0, 3],
                            "parameters": {"density": [{"filter": "attn", "value": [0.2, 0.6]}]},
                        },
                    ],
                    "parameters": {"density": 0.4},
                }
            ],
            "overrides": [{"pattern": "up_proj", "parameters": {"weight": 0.25}}],
        }  # fmt: skip
    )
    piece = r.slices[0]
    base, models = r.slice_roles(piece)
    assert base.path == "b" and [s.path for s in models] == ["m"]

    def at(name, t, override=None):
        own = [(s.parameters, name) for s in models]
        return r.resolve(override, name=name, t=t, piece=piece, own=own)

    _, g, m = at("model.layers.1.self_attn.q_proj.weight", 0.5)
    assert g["lambda"] == 1.0 and m == [{"weight": 0.5, "density": 0.4}]  # source's filter: "attn" in name
    _, g, m = at("model.layers.1.mlp.up_proj.weight", 0.5)
    assert g["lambda"] == 0.75 and m[0]["density"] == 0.4  # no source filter matched: the slice's value
    _, _, m = at("model.layers.1.mlp.up_proj.weight", 0.5, r.overrides[0])
    assert m[0]["weight"] == 0.25
    _, _, m = at("model.layers.2.self_attn.k_proj.weight", 1.0)
    assert m[0] == {"weight": 1.0, "density": 0.6}


def test_statistics_methods_take_no_slices():
    src = [{"model": "m", "layer_range": [0, 2], "parameters": {"fisher": "f"}}]
    with pytest.raises(ValueError, match="'fisher' .* does not take slices"):
        parse_recipe({"merge_method": "fisher", "slices": [{"sources": src}]})
