"""RegMean: the merged layer against a dense least-squares solve on the stacked inputs, estimate_gram against
layer inputs computed by hand, streamed merges of tiny Llamas and GPT-2s (Conv1D) against the formula
applied in memory, and bad inputs (all refused with a named error, no output folder)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from robustft.core.statistics import save_fisher
from robustft.merge import Grams, estimate_gram, merge_checkpoints, parse_recipe, save_gram
from robustft.merge.io import GramFile
from robustft.ops import merge as M
from tests.merge.tiny_models import build_family, load_all, save_model


def _scaled_rows(x: torch.Tensor, ratio: float, weight: float) -> torch.Tensor:
    """Rows R with R^T R = weight * (ratio G + (1 - ratio) diag(G)) for the mean Gram G = x^T x / n."""
    x = x * (weight / x.shape[0]) ** 0.5
    diag = (x * x).sum(0).sqrt()
    return torch.cat([x * ratio**0.5, torch.diag(diag) * (1 - ratio) ** 0.5])


@pytest.mark.parametrize("ratio", [1.0, 0.7, 0.0])
def test_regmean_is_the_least_squares_fit_to_every_models_outputs(ratio):
    """ratio 1: W* = argmin_W sum_k (w_k / n_k) ||X_k W^T - X_k W_k^T||^2, by lstsq on the stacked X_k;
    ratio < 1: the same with each model's diagonal (1 - ratio) diag(G_k) stacked as extra input rows."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, sizes, weights = 5, 7, [9, 12, 8], [1.0, 2.0, 0.5]
    xs = [torch.randn(n, in_f, generator=g, dtype=torch.float64) * (1 + k) for k, n in enumerate(sizes)]
    ws = [torch.randn(out_f, in_f, generator=g, dtype=torch.float64) for _ in sizes]
    rows = [_scaled_rows(x, ratio, c) for x, c in zip(xs, weights, strict=True)]
    lhs = torch.cat(rows)
    rhs = torch.cat([r @ w.T for r, w in zip(rows, ws, strict=True)])
    ref = torch.linalg.lstsq(lhs, rhs).solution.T
    grams = (x.T @ x / x.shape[0] for x in xs)  # a generator: consumed one Gram at a time
    got = M.regmean(ws, grams, ratio, weights)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    if ratio == 1.0:  # the optimum: no other W does better on the stacked objective
        loss = lambda w: sum(((r @ (w - wk).T) ** 2).sum() for r, wk in zip(rows, ws, strict=True))  # noqa: E731
        assert loss(got) <= loss(got + 1e-3 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64))


def test_regmean_refuses_a_singular_system_and_bad_arguments():
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(3, 6, generator=g) for _ in range(2)]
    few = torch.randn(4, 6, generator=g)  # 4 rows in 6 dimensions: rank 4
    with pytest.raises(ValueError, match="singular.*reduce_non_diagonal_ratio < 1"):
        M.regmean(w, [few.T @ few, few.T @ few], 1.0)
    M.regmean(w, [few.T @ few, few.T @ few], 0.9)  # the kept diagonal makes it definite
    dead = torch.randn(20, 6, generator=g)
    dead[:, 2] = 0  # an input feature that is zero everywhere stays singular
    with pytest.raises(ValueError, match="singular"):
        M.regmean(w, [dead.T @ dead] * 2, 0.5)
    full = torch.eye(6)
    with pytest.raises(ValueError, match=r"grams\[1\] has shape \(3, 3\), expected \(6, 6\)"):
        M.regmean(w, [full, torch.eye(3)])
    with pytest.raises(ValueError, match="reduce_non_diagonal_ratio"):
        M.regmean(w, [full, full], 1.5)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        M.regmean(w, [full, full], 1.0, [1.0, -1.0])
    with pytest.raises(ValueError, match="2-D"):
        M.regmean([torch.randn(6)] * 2, [full, full])


class Tiny(nn.Module):
    """Embedding -> Linear -> ReLU -> GPT-2 Conv1D -> masked mean pool -> Linear head, with dropout."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(6, 5)
        self.conv = Conv1D(4, 5)  # nf=4 outputs, nx=5 inputs: weight (5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.conv(torch.relu(self.lin(self.drop(self.emb(input_ids)))))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def _hand_inputs(model: Tiny, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's input rows, computed without hooks (padding rows dropped where the input is per token)."""
    with torch.no_grad():
        e = model.emb(ids)
        a = torch.relu(model.lin(e))
        h = model.conv(a)
        m = mask.unsqueeze(-1).float()
        keep = mask.reshape(-1) != 0
        return {
            "lin.weight": e.reshape(-1, 6)[keep],
            "conv.weight": a.reshape(-1, 5)[keep],
            "head.weight": (h * m).sum(1) / m.sum(1),
        }


def test_estimate_gram_equals_the_gram_of_the_layer_inputs():
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[3, 2:] = 0
    loader = [{"input_ids": ids[:3], "attention_mask": mask[:3]},
              {"input_ids": ids[3:], "attention_mask": mask[3:]}]  # fmt: skip
    model.train()
    grams = estimate_gram(model, loader)
    assert model.training, "train mode restored"
    assert all(not m._forward_hooks for m in model.modules()), "hooks removed"
    model.eval()
    rows = _hand_inputs(model, ids, mask)
    assert set(grams.matrices) == set(rows)
    for name, x in rows.items():
        torch.testing.assert_close(grams.matrices[name], x.T @ x, rtol=1e-5, atol=1e-5, msg=name)
        assert grams.counts[name] == x.shape[0], name
    assert grams.counts["lin.weight"] == int(mask.sum()) and grams.counts["head.weight"] == 5
    assert grams.input_axis == {"lin.weight": 1, "conv.weight": 0, "head.weight": 1}

    # at most 4 examples: the first batch and one row of the second; exclude by weight name
    limited = estimate_gram(model, loader, max_examples=4, exclude="head")
    rows = _hand_inputs(model, ids[:4], mask[:4])
    assert set(limited.matrices) == {"lin.weight", "conv.weight"}
    for name in limited.matrices:
        torch.testing.assert_close(limited.matrices[name], rows[name].T @ rows[name], rtol=1e-5, atol=1e-5)


def test_estimate_gram_cleans_up_when_the_model_raises():
    model = Tiny().train()
    bad = [{"input_ids": torch.full((2, 3), 99), "attention_mask": torch.ones(2, 3)}]  # ids out of range
    with pytest.raises(IndexError):
        estimate_gram(model, bad)
    assert model.training and all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D weight selected"):
        estimate_gram(model, bad, include="emb")
    with pytest.raises(ValueError, match="yielded no examples"):
        estimate_gram(model, [])


def _grams_of(model: nn.Module, seed: int) -> Grams:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=g)
    mask = torch.ones_like(ids)  # 82 + 4 seed tokens: more than the widest input (64), so definite Grams
    mask[1, 7:] = 0
    mask[4, 3 + 4 * seed :] = 0  # models see different numbers of tokens: the counts normalise
    return estimate_gram(model, [{"input_ids": ids[:4], "attention_mask": mask[:4]},
                                 {"input_ids": ids[4:], "attention_mask": mask[4:]}])  # fmt: skip


def _dense_regmean(ws, grams, counts, weights, ratio, input_axis):
    """sum_k c_k G~_k / n_k solved against sum_k c_k G~_k / n_k W_k (W_k^T for an (out, in) weight)."""
    lhs, rhs = 0, 0
    for w, gram, n, c in zip(ws, grams, counts, weights, strict=True):
        gram = gram.double() / n
        g_tilde = ratio * gram + (1 - ratio) * torch.diag(torch.diagonal(gram))
        lhs = lhs + c * g_tilde
        rhs = rhs + c * g_tilde @ (w.double().T if input_axis == 1 else w.double())
    solved = torch.linalg.solve(lhs, rhs)
    return (solved.T if input_axis == 1 else solved).float()


def _check_merge(out, dirs, gram_files, weights, ratio):
    got = load_all(out)
    fts = [load_all(d) for d in dirs]
    grams = [load_file(str(f)) for f in gram_files]
    meta = [GramFile(f) for f in gram_files]
    merged_by_gram = 0
    for name in fts[0]:
        ws = [ft[name] for ft in fts]
        if name in grams[0]:
            counts, axis = [m.counts[name] for m in meta], meta[0].input_axis[name]
            ref = _dense_regmean(ws, [gr[name] for gr in grams], counts, weights, ratio, axis)
            merged_by_gram += 1
        else:
            ref = sum(c * w for c, w in zip(weights, ws, strict=True)) / sum(weights)
        torch.testing.assert_close(got[name], ref, rtol=2e-4, atol=2e-5, msg=name)
    return merged_by_gram


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean")
    base_dir, dirs = build_family(root, n=2, tokenizer=False)
    files = [save_gram(_grams_of(LlamaForCausalLM.from_pretrained(d), seed=i), root / f"g{i}.safetensors")
             for i, d in enumerate(dirs)]  # fmt: skip
    return root, dirs, files


def test_regmean_recipe_on_tiny_llamas_with_estimated_grams(llamas, tmp_path):
    root, dirs, gram_files = llamas
    with pytest.raises(FileExistsError):
        save_gram(Grams(), gram_files[-1])
    recipe = _regmean_recipe(dirs, gram_files, reduce_non_diagonal_ratio=0.9)
    recipe["models"][1]["parameters"]["weight"] = 2.0
    merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    # every linear weight (7 per layer, 2 layers, and lm_head) merged by RegMean, the rest by the mean
    assert _check_merge(tmp_path / "out", dirs, gram_files, [1.0, 2.0], 0.9) == 15
    LlamaForCausalLM.from_pretrained(tmp_path / "out")


def test_regmean_recipe_on_gpt2_conv1d_weights(tmp_path):
    """GPT-2 stores its Conv1D weights as (in, out): the Grams say so and the merge solves on that axis."""
    config = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    dirs, gram_files = [], []
    for i in range(2):
        model = GPT2LMHeadModel(config)
        dirs.append(save_model(model, tmp_path / f"gpt{i}"))
        grams = _grams_of(model, seed=i)
        assert grams.input_axis["transformer.h.0.attn.c_attn.weight"] == 0
        gram_files.append(save_gram(grams, tmp_path / f"gram{i}.safetensors"))
    recipe = _regmean_recipe(dirs, gram_files)
    # a fresh LayerNorm (bias 0) outputs zero-mean rows: c_attn's and c_fc's Grams are singular
    with pytest.raises(ValueError, match="c_attn.weight' \\(regmean\\): .*singular"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    recipe["parameters"] = {"reduce_non_diagonal_ratio": 0.6}  # FusionBench's GPT-2 configuration
    merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    # c_attn, c_proj (attention), c_fc, c_proj (MLP), and wte: tied to lm_head (not saved on its own), so
    # its Gram is the lm_head's input (as FusionBench, whose lm_head result overwrites the tied matrix)
    assert _check_merge(tmp_path / "out", dirs, gram_files, [1.0, 1.0], 0.6) == 5
    GPT2LMHeadModel.from_pretrained(tmp_path / "out")


def _regmean_recipe(dirs, grams, **parameters):
    models = [{"model": str(d), "parameters": {} if g is None else {"gram": str(g)}}
              for d, g in zip(dirs, grams, strict=True)]  # fmt: skip
    return {"merge_method": "regmean", "models": models, "parameters": parameters}


def test_regmean_bad_inputs_are_named_and_write_nothing(llamas, tmp_path):
    root, dirs, files = llamas
    q = "model.layers.0.self_attn.q_proj.weight"
    good = load_file(str(files[1]))
    meta = GramFile(files[1])
    wrong = Grams({**good, q: torch.eye(5)}, meta.counts, meta.input_axis)
    missing_one = Grams({k: v for k, v in good.items() if k != q}, meta.counts, meta.input_axis)
    few = Grams(dict(good), {**meta.counts}, meta.input_axis)
    # 3 input rows for a 32-wide layer: rank 3 in both models
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    few.matrices[q] = x.T @ x
    few_file = save_gram(few, tmp_path / "few.safetensors")
    cases = [
        (_regmean_recipe(dirs, [files[0], None]), ValueError, r"models\[1\].*needs parameter 'gram'"),
        (_regmean_recipe(dirs, [files[0], tmp_path / "no.safetensors"]), FileNotFoundError, "no.safetensors"),
        (_regmean_recipe(dirs, [files[0], save_gram(wrong, tmp_path / "w.safetensors")]), ValueError,
         rf"Gram '{q}' in .*w.safetensors has shape \(5, 5\), expected \(32, 32\)"),
        (_regmean_recipe(dirs, [files[0], save_gram(missing_one, tmp_path / "m.safetensors")]), ValueError,
         rf"tensor '{q}' has a Gram in .* but none in .*m.safetensors"),
        (_regmean_recipe(dirs, [files[0], save_fisher(good, tmp_path / "f.safetensors")]), ValueError,
         "f.safetensors is not a Gram file"),
        (_regmean_recipe(dirs, [few_file, few_file]), ValueError,
         rf"tensor '{q}' \(regmean\): .*singular.*reduce_non_diagonal_ratio < 1"),
        (_regmean_recipe(dirs, files, reduce_non_diagonal_ratio=2), ValueError, "reduce_non_diagonal_ratio"),
        ({**_regmean_recipe(dirs, files), "overrides": [{"pattern": "norm", "merge_method": "regmean"}]},
         ValueError, "no tensor it merges has a Gram"),
    ]  # fmt: skip
    for data, error, match in cases:
        out = tmp_path / "out"
        with pytest.raises(error, match=match):
            merge_checkpoints(parse_recipe(data), out, progress=False)
        assert not out.exists(), match
        assert not list(tmp_path.glob(".out.*")), match
    with pytest.raises(ValueError, match="weight must be"):
        parse_recipe({**_regmean_recipe(dirs, files), "parameters": {"weight": -1.0}})
    # the same singular Grams with the diagonal kept merge fine
    kept = _regmean_recipe(dirs, [few_file, few_file], reduce_non_diagonal_ratio=0.5)
    merge_checkpoints(parse_recipe(kept), tmp_path / "ok", progress=False)
