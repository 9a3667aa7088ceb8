"""The streamed merge engine: outputs equal the in-memory merge of fully loaded state dicts, load with
from_pretrained, respect overrides/dtype/seed, and bad input stops before any file is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from robustft.cli import main
from robustft.merge import merge_checkpoints, parse_recipe
from robustft.merge.engine import tensor_seed
from robustft.ops import merge as M
from tests.merge.tiny_models import build_family, load_all, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _recipe(base, models, method, parameters=None, model_params=None, **extra):
    data = {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": (model_params[i] if model_params else {})}
            for i, m in enumerate(models)
        ],
        "parameters": parameters or {},
        **extra,
    }
    if base is not None:
        data["base_model"] = str(base)
    return data


def _write_recipe(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_ties_merge_of_sharded_llama_streams_loads_and_matches_in_memory(family, tmp_path):
    base_dir, dirs = family
    assert len(list(base_dir.glob("*.safetensors"))) >= 3, "fixture must be sharded"
    data = _recipe(
        base_dir,
        dirs,
        "ties",
        {"density": 0.4, "lambda": 0.9},
        [{"weight": 1.0}, {"weight": 0.5, "density": 0.7}, {}],
        overrides=[
            {"pattern": r"embed_tokens", "merge_method": "base"},
            {"pattern": r"\.mlp\.", "parameters": {"density": 0.9}},
        ],
    )
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "merge", str(_write_recipe(tmp_path, data)), "--out", str(out),
         "--max-shard-size", "30KB"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "merging" in proc.stderr  # the tqdm bar
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".merged.tmp-*"))

    # reference: every model fully in memory, the same per-tensor rule from ops
    base, fts = load_all(base_dir), [load_all(d) for d in dirs]
    merged = LlamaForCausalLM.from_pretrained(out).state_dict()
    AutoTokenizer.from_pretrained(out)
    assert set(merged) == set(base)
    for name, b in base.items():
        deltas = [ft[name] - b for ft in fts]
        if "embed_tokens" in name:
            ref = b
        else:
            dens = 0.9 if ".mlp." in name else 0.4
            ref = b + 0.9 * M.ties(deltas, [dens, 0.7 if ".mlp." not in name else 0.9, dens], [1.0, 0.5, 1.0])
        torch.testing.assert_close(merged[name], ref, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "method,params,reference",
    [
        ("linear", {"weight": 1.0}, lambda b, ts, n: (sum(ts) + b) / (len(ts) + 1)),  # base: one more input
        (
            "task_arithmetic",
            {"lambda": 0.5},
            lambda b, ts, n: b + 0.5 * M.task_arithmetic([t - b for t in ts]),
        ),
        (
            "dare_linear",
            {"density": 0.7},
            lambda b, ts, n: b + M.dare_merge([t - b for t in ts], 0.7, tensor_seed(7, n)),
        ),
        (
            "dare_ties",
            {"drop_rate": 0.3},  # robustft's alias of density 0.7
            lambda b, ts, n: b + M.dare_merge([t - b for t in ts], 0.7, tensor_seed(7, n), method="ties"),
        ),
        (
            "breadcrumbs",
            {"density": 0.45, "gamma": 0.05},
            lambda b, ts, n: b + sum(M.breadcrumbs(t - b, 0.45, 0.05) for t in ts),
        ),
        (
            "magnitude_prune",
            {"density": 0.3},
            lambda b, ts, n: b + sum(M.magnitude_prune(t - b, 0.3) for t in ts),
        ),
        (
            "consensus",
            {"k": 2, "tall_lambda": 0.5},
            lambda b, ts, n: b + M.consensus_merge([t - b for t in ts], 2, 0.5),
        ),
        ("model_stock", {}, lambda b, ts, n: M.model_stock(b, ts)),
        (
            "della",
            {"density": 0.5, "epsilon": 0.2, "lambda": 0.8},
            lambda b, ts, n: b + 0.8 * M.della_merge([t - b for t in ts], 0.5, 0.2, tensor_seed(7, n)),
        ),
        (
            "della_linear",
            {"density": 0.4, "epsilon": 0.1, "rescale": False},
            lambda b, ts, n: (
                b
                + M.della_merge(
                    [t - b for t in ts],
                    0.4,
                    0.1,
                    tensor_seed(7, n),
                    method="linear",
                    rescale=False,
                    normalize=False,
                )
            ),
        ),
        (
            "breadcrumbs_ties",
            {"density": 0.45, "gamma": 0.05},
            lambda b, ts, n: (
                b
                + M.disjoint_mean(
                    bc := [M.breadcrumbs(t - b, 0.45, 0.05) for t in ts], M.elect_sign(bc), normalize=False
                )
            ),
        ),
        ("sce", {"select_topk": 0.4}, lambda b, ts, n: b + M.sce([t - b for t in ts], 0.4)),
        ("ram", {"epsilon": 0.02}, lambda b, ts, n: b + M.ram([t - b for t in ts], 0.02)),
        (
            "ramplus_tl",
            {"epsilon": 0.02, "r": 0.5},
            lambda b, ts, n: b + M.ramplus_tl([t - b for t in ts], 0.02, 0.5, 0.2),
        ),
        # SVD merges: 2-D tensors through the SVDs, norms (1-D) averaged
        ("tsv_m", {"alpha": 0.7}, lambda b, ts, n: b + 0.7 * M.tsv_merge([t - b for t in ts])),
        ("iso_c", {"scaling_factor": 0.5}, lambda b, ts, n: b + 0.5 * M.iso_c([t - b for t in ts])),
        (
            "iso_cts",
            {"common_space_fraction": 0.5, "scaling_factor": 1.5},
            lambda b, ts, n: b + 1.5 * M.iso_cts([t - b for t in ts], 0.5),
        ),
    ],
)
def test_each_method_streamed_equals_in_memory(family, tmp_path, method, params, reference):
    base_dir, dirs = family
    merge_checkpoints(
        parse_recipe(_recipe(base_dir, dirs, method, params, seed=7)), tmp_path / "o", progress=False
    )
    got = load_all(tmp_path / "o")
    base, fts = load_all(base_dir), [load_all(d) for d in dirs]
    for name, b in base.items():
        torch.testing.assert_close(got[name], reference(b, [ft[name] for ft in fts], name), msg=name)


def test_slerp_and_dtype_and_seed_reproducible(family, tmp_path):
    base_dir, dirs = family
    r = parse_recipe(_recipe(base_dir, dirs[:1], "slerp", {"t": 0.25}, dtype="bfloat16"))
    merge_checkpoints(r, tmp_path / "s", progress=False)
    got, base, ft = load_all(tmp_path / "s"), load_all(base_dir), load_all(dirs[0])
    for name, b in base.items():
        assert got[name].dtype == torch.bfloat16
        # the dense formula on the inputs rounded to ``dtype`` first, as mergekit casts them
        fb, ff = (x.bfloat16().double().reshape(-1) for x in (b, ft[name]))
        om = torch.arccos(fb @ ff / (fb.norm() * ff.norm()))
        want = (torch.sin(0.75 * om) * fb + torch.sin(0.25 * om) * ff) / torch.sin(om)
        torch.testing.assert_close(got[name], want.reshape(b.shape).to(torch.bfloat16), msg=name)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
    assert LlamaForCausalLM.from_pretrained(tmp_path / "s").dtype == torch.bfloat16

    dare = _recipe(base_dir, dirs, "dare_ties", {"drop_rate": 0.5}, seed=3)
    for out in ("d1", "d2"):
        merge_checkpoints(parse_recipe(dare), tmp_path / out, progress=False)
    merge_checkpoints(parse_recipe({**dare, "seed": 4}), tmp_path / "d3", progress=False)
    a, b, c = (load_all(tmp_path / o) for o in ("d1", "d2", "d3"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_overwrite_only_when_asked(family, tmp_path):
    base_dir, dirs = family
    r = parse_recipe(_recipe(base_dir, dirs, "task_arithmetic"))
    out = tmp_path / "o"
    merge_checkpoints(r, out, progress=False)
    (out / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        merge_checkpoints(r, out, progress=False)
    assert (out / "marker").is_file()
    merge_checkpoints(r, out, overwrite=True, progress=False)
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def wrong_shape(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrong")
    base, _ = build_family(root, n=0, config=tiny_config(intermediate=48), tokenizer=False)
    return base


def _bad_cases(family, wrong_shape, tmp_path):
    base_dir, dirs = family
    missing = tmp_path / "missing"
    missing.mkdir()
    sd = load_all(dirs[0])
    sd.pop("model.layers.1.mlp.up_proj.weight")
    from safetensors.torch import save_file

    save_file(sd, str(missing / "model.safetensors"))
    return [
        (
            _recipe(base_dir, [dirs[0], wrong_shape], "ties"),
            r"mlp.down_proj.weight. has shape \(32, 48\) in models\[1\]",
        ),
        (_recipe(base_dir, [dirs[0], missing], "ties"), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
        (_recipe(base_dir, dirs, "median"), "unknown merge method 'median'"),
        (
            _recipe(base_dir, dirs, "ties", {"densty": 0.3}),
            "unknown parameter 'densty' for merge_method 'ties'",
        ),
        (_recipe(base_dir, dirs, "ties", {"density": 1.5}), "density must be in"),
        (_recipe(base_dir, dirs, "ties", overrides=[{"pattern": "nope"}]), "matches no tensor"),
        (_recipe(None, dirs, "ties"), "needs base_model"),
        (_recipe(base_dir, dirs, "slerp"), "at most 1 model"),
        (_recipe(base_dir, [tmp_path / "nowhere"], "ties"), "does not exist"),
        (_recipe(base_dir, dirs, "fisher"), "needs parameter 'fisher'"),
        ({**_recipe(base_dir, dirs, "ties"), "dtyp": "float16"}, "unknown option"),
        ({**_recipe(base_dir, dirs, "ties"), "tokenizer_source": str(tmp_path / "tok")}, "tokenizer_source"),
    ]


def test_bad_input_errors_before_writing(family, wrong_shape, tmp_path):
    for data, match in _bad_cases(family, wrong_shape, tmp_path):
        out = tmp_path / "out"
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            merge_checkpoints(parse_recipe(data), out, progress=False)
        assert not out.exists(), match
        assert not list(tmp_path.glob(".out.*")), match


def test_cli_reports_bad_input_with_exit_code_2(family, wrong_shape, tmp_path):
    base_dir, dirs = family
    path = _write_recipe(tmp_path, _recipe(base_dir, [dirs[0], wrong_shape], "ties"))
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "merge", str(path), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "robustft merge: error:" in proc.stderr and "has shape" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5})])
def test_workers_change_nothing_but_speed(family, tmp_path, method, params):
    """Tensors merged by 1 or 3 threads at once: the same bytes in every output file (seeded methods too:
    each tensor's seed comes from its name, not from the order it was computed in)."""
    base_dir, dirs = family
    data = _recipe(base_dir, dirs, method, params, seed=7)
    threads = torch.get_num_threads()
    merge_checkpoints(parse_recipe(data), tmp_path / "1", progress=False, workers=1)
    cli = ["merge", str(_write_recipe(tmp_path, data)), "--out", str(tmp_path / "3"), "--workers", "3"]
    assert main([*cli, "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the pool's single-threaded torch is undone
    files = sorted(f.name for f in (tmp_path / "1").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "3").iterdir())
    for f in files:
        if f.endswith(".safetensors"):
            assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "3" / f).read_bytes(), f


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_workers_are_refused_before_writing(family, tmp_path, workers):
    base_dir, dirs = family
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        merge_checkpoints(parse_recipe(_recipe(base_dir, dirs, "ties", {})), tmp_path / "o", workers=workers)
    assert not (tmp_path / "o").exists()


def test_nan_under_a_trim_is_an_error_naming_the_tensor(family, tmp_path):
    """TIES cannot take the top k of a task vector holding NaN: the error names the tensor, writes nothing."""
    from safetensors.torch import save_file

    base_dir, dirs = family
    tensors = load_all(dirs[0])
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    models = [str(tmp_path / "nan.safetensors"), str(dirs[1])]
    data = {"merge_method": "ties", "base_model": str(base_dir), "models": models}
    recipe = parse_recipe({**data, "parameters": {"density": 0.5}})
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' \(ties\): .*NaN"):
        merge_checkpoints(recipe, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_gradients_need_known_layer_names_filters_do_not(tmp_path):
    """GPT-2 names its blocks ``h.<i>.``: a gradient cannot be placed on its layers and is refused by name
    (never spread as if every tensor sat at t = 0); a filter list needs no position and merges as the dense
    formula says."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
        model.save_pretrained(tmp_path / f"g{seed}")
        dirs.append(tmp_path / f"g{seed}")
    models = [
        {"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, ([1, 2], 1.0), strict=True)
    ]
    with pytest.raises(ValueError, match=r"gradients: .* does not name its blocks.*'transformer.h.0"):
        merge_checkpoints(parse_recipe({"merge_method": "linear", "models": models}), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    models[0]["parameters"]["weight"] = [{"filter": "attn", "value": 3.0}, {"value": 1.0}]
    merge_checkpoints(
        parse_recipe({"merge_method": "linear", "models": models}), tmp_path / "f", progress=False
    )
    got, a, b = load_all(tmp_path / "f"), load_all(dirs[0]), load_all(dirs[1])
    for name, x in got.items():
        if not x.is_floating_point():
            continue
        w = 3.0 if "attn" in name else 1.0
        torch.testing.assert_close(x, (w * a[name] + b[name]) / (w + 1), msg=name)
