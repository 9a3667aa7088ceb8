"""MoE checkpoints (expert and router tensors) through ``robustft merge``: a tiny Mixtral saved by
transformers (per-expert ``block_sparse_moe.experts.<e>.w1/w2/w3``, router ``block_sparse_moe.gate``), read
in the model layout (fused 3-D ``mlp.experts.gate_up_proj``/``down_proj``) as mergekit 0.1.5 does, against
mergekit run in the test; fused 3-D expert tensors against the dense formula per tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralForCausalLM

from robustft.merge import merge_checkpoints, parse_recipe
from tests.merge.tiny_models import load_all, mergekit_options
from tests.tiny import tiny_mixtral

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")


def fine_tuned(model: MixtralForCausalLM, seed: int, scale: float = 0.05) -> MixtralForCausalLM:
    """``model`` with every parameter moved by seeded noise (a stand-in for a fine-tune), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_family")
    tiny_mixtral().save_pretrained(root / "base")
    for i in (1, 2):
        fine_tuned(tiny_mixtral(), i).save_pretrained(root / f"ft{i}")
    return root


RECIPES = {
    "linear": ({"merge_method": "linear"}, [{"weight": 0.3}, {"weight": 0.7}]),
    "task_arithmetic": ({"merge_method": "task_arithmetic"}, [{"weight": 0.8}, {"weight": 0.5}]),
    "ties": ({"merge_method": "ties", "parameters": {"normalize": True}},
             [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}]),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mixtral_merge_equals_mergekit(family, tmp_path, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    top, params = RECIPES[name]
    recipe = {**top, "dtype": "float32",
              "models": [{"model": str(family / f"ft{i}"), "parameters": p} for i, p in zip((1, 2), params)]}
    if name != "linear":
        recipe["base_model"] = str(family / "base")
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), mergekit_options())
    merge_checkpoints(parse_recipe(recipe), tmp_path / "rf", progress=False, workers=1)
    mk, rf = load_all(tmp_path / "mk"), load_all(tmp_path / "rf")
    assert set(rf) == set(mk)
    assert "model.layers.0.mlp.gate.weight" in rf
    assert rf["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 16, 16)
    for key in rf:
        close = torch.isclose(rf[key], mk[key].to(rf[key].dtype), rtol=1e-5, atol=1e-6)
        assert float((~close).float().mean()) <= (1e-3 if name == "ties" else 0.0), key  # TIES sign ties
    MixtralForCausalLM.from_pretrained(tmp_path / "rf")  # loads back into the fused layout


def ties_reference(base, tensors, weights, densities):
    """TIES (Yadav et al. 2023) on one whole tensor, densely: trim each task vector to its top-k magnitudes,
    elect the sign of the weighted sum, average (weighted, normalized) the agreeing entries."""
    taus = [t - base for t in tensors]
    trimmed = []
    for tau, d in zip(taus, densities):
        k = int(d * tau.numel())
        flat = tau.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        trimmed.append((flat * keep).reshape(tau.shape))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    sign = torch.sign(sum(weighted))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in trimmed]
    num = sum(w * t * a for w, t, a in zip(weights, trimmed, agree))
    den = sum(w * a.to(t.dtype) for w, t, a in zip(weights, trimmed, agree))
    return base + num / den.clamp(min=1e-8) * (den != 0)


def test_fused_3d_expert_tensors_merge_per_tensor(tmp_path):
    """A checkpoint holding fused experts as 3-D tensors (as transformers keeps them in memory): each method
    applies to the whole 3-D tensor as to any other tensor (TIES' top-k over all experts together)."""
    models = [tiny_mixtral(), fine_tuned(tiny_mixtral(), 1), fine_tuned(tiny_mixtral(), 2)]
    for i, m in enumerate(models):
        state = {k: v.contiguous() for k, v in m.state_dict().items() if "mlp" in k}
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}.safetensors").rename(tmp_path / f"m{i}" / "model.safetensors")
    states = [load_all(tmp_path / f"m{i}") for i in range(3)]
    assert states[0]["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    w, dens = [1.0, 0.6], [0.5, 0.7]
    recipes = {
        "linear": lambda b, x, y: 0.3 * x + 0.7 * y,
        "task_arithmetic": lambda b, x, y: b + 0.8 * (x - b) + 0.5 * (y - b),
        "ties": lambda b, x, y: ties_reference(b.double(), [x.double(), y.double()], w, dens).float(),
    }
    params = {"linear": [{"weight": 0.3}, {"weight": 0.7}],
              "task_arithmetic": [{"weight": 0.8}, {"weight": 0.5}],
              "ties": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}]}
    for name, formula in recipes.items():
        models = [{"model": str(tmp_path / f"m{i}"), "parameters": p} for i, p in zip((1, 2), params[name])]
        recipe = {"merge_method": name, "dtype": "float32", "models": models}
        if name != "linear":
            recipe["base_model"] = str(tmp_path / "m0")
        if name == "ties":
            recipe["parameters"] = {"normalize": True}
        merge_checkpoints(parse_recipe(recipe), tmp_path / name, progress=False, workers=1)
        got = load_all(tmp_path / name)
        for key, value in got.items():
            ref = formula(*(s[key] for s in states))
            torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_model_layout_view_reads_what_from_pretrained_builds(family):
    from robustft.merge.io import CheckpointReader, ModelLayoutView, model_layout

    view = model_layout(CheckpointReader(family / "ft1"))
    assert isinstance(view, ModelLayoutView)
    live = {k: v.detach() for k, v in MixtralForCausalLM.from_pretrained(family / "ft1").state_dict().items()}
    assert set(view.names) == set(live)
    for name in view.names:
        assert view.infos[name].shape == tuple(live[name].shape), name
        assert torch.equal(view.get(name), live[name]), name
