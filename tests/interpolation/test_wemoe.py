"""WEMoE against independent references: fine-tuned models (one-hot routers), dense task arithmetic (constant
routers), per-sample merged weights through functional_call (trained-looking routers), a hand-written
entropy-minimisation step, and a save/load round trip."""

import copy
import os
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from robustft.interpolation.wemoe import (
    fit_wemoe,
    fit_wemoe_router,
    load_wemoe,
    save_wemoe,
    upscale_wemoe,
    wemoe_options,
)
from tests.tiny import tiny_bert, tiny_gpt2, tiny_llama

#: the MLP weights of each architecture, written here independently of
#: robustft.interpolation.wemoe.ARCHITECTURES
MLP = {
    "llama": r"\.mlp\.(gate_proj|up_proj|down_proj)\.",
    "gpt2": r"\.mlp\.(c_fc|c_proj)\.",
    "bert": r"\.layer\.\d+\.(intermediate\.dense|output\.dense)\.",  # not attention.output.dense
}
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _perturbed(model, seed, only=None, scale=0.3):
    """A 'fine-tuned' model: a copy with noise on every parameter (or those whose name matches ``only``)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if only is None or re.search(only, f".{n}"):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def _inputs(seed=0, n=3, t=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, t, dtype=torch.long)}


def _fix_routers(model, values):
    """Every router outputs the constant vector ``values`` (last layer's weight 0, bias = values)."""
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "WEMoERouter":
                m.fc2.weight.zero_()
                m.fc2.bias.copy_(torch.tensor(values, dtype=m.fc2.bias.dtype))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_one_hot_router_equals_that_task_s_fine_tuned_model(arch):
    start = MAKERS[arch](0).eval()
    ends = [_perturbed(start, s, only=MLP[arch]) for s in (1, 2)]  # they differ from the start in MLPs only
    before = _state(start)
    model = upscale_wemoe(start, ends, scaling_factor=0.3)
    batch = _inputs()
    for k, end in enumerate(ends):
        _fix_routers(model, [1.0 if i == k else 0.0 for i in range(len(ends))])
        torch.testing.assert_close(_logits(model, batch), _logits(end, batch), rtol=1e-5, atol=1e-5)
    # with K=1 and scaling factor 1 the whole model (not only its MLPs) is the fine-tuned one
    end = _perturbed(start, 3)
    single = upscale_wemoe(start, [end], scaling_factor=1.0)
    _fix_routers(single, [1.0])
    torch.testing.assert_close(_logits(single, batch), _logits(end, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_state(start), before, rtol=0, atol=0)  # the start was only read


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_constant_router_equals_task_arithmetic_with_those_coefficients(arch):
    start = MAKERS[arch](0).eval()
    ends = [_perturbed(start, s) for s in (1, 2)]
    c, lam = [0.7, -0.2], 0.4
    model = upscale_wemoe(start, ends, scaling_factor=lam, router_hidden_layers=2)
    _fix_routers(model, c)
    # the reference: dense θ written into a copy of the start, MLP weights at coefficients c, the rest at λ
    reference = copy.deepcopy(start)
    s_sd = dict(start.named_parameters())
    e_sd = [dict(e.named_parameters()) for e in ends]
    with torch.no_grad():
        for n, p in reference.named_parameters():
            coef = c if re.search(MLP[arch], f".{n}") else [lam, lam]
            p.copy_(s_sd[n] + sum(coef[k] * (e_sd[k][n] - s_sd[n]) for k in range(2)))
    batch = _inputs(1)
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_learned_router_equals_the_block_at_per_input_merged_weights(routing):
    start = tiny_llama(0).double().eval()  # float64: routing weights far from 0 make float32 sums inexact
    ends = [_perturbed(start, s) for s in (1, 2, 3)]
    model = upscale_wemoe(start, ends, routing=routing)
    block = model.model.layers[1].mlp
    router = block.wemoe_router
    with torch.no_grad():  # a router far from its initialisation, so routing weights differ by input
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        got = block(h)
        gate = router.fc2(torch.relu(router.fc1(h)))  # (N, T, K)
    original = start.model.layers[1].mlp
    names = [n for n, _ in original.named_parameters()]
    s = dict(original.named_parameters())
    taus = [{n: dict(e.model.layers[1].mlp.named_parameters())[n] - s[n] for n in names} for e in ends]

    def at(r, x):  # FusionBench's way: the block called at θ_start + Σ_k r_k τ_k
        theta = {n: s[n] + sum(r[k] * taus[k][n] for k in range(3)) for n in names}
        return functional_call(original, theta, (x,))

    with torch.no_grad():
        if routing == "sequence":
            want = torch.cat([at(gate[i].mean(0), h[i : i + 1]) for i in range(2)])
        else:
            want = torch.stack([torch.cat([at(gate[i, t], h[i, t : t + 1]) for t in range(5)])
                                for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sequence_routing_ignores_padding():
    start = tiny_bert(0).eval()
    model = upscale_wemoe(start, [_perturbed(start, 1), _perturbed(start, 2)])
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "WEMoERouter":
                m.fc2.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    assert wemoe_options(model)["routing"] == "sequence"
    alone = {"input_ids": torch.tensor([[7, 8, 9, 10]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    padded = {"input_ids": torch.tensor([[7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])}
    torch.testing.assert_close(_logits(model, padded)[0], _logits(model, alone)[0], rtol=1e-5, atol=1e-6)


def _hand_written_entropy_steps(model, batches, lr, steps):
    """Adam on the router parameters by hand: the mean over sequences of the mean token entropy (mask)."""
    routers = [p for n, p in model.named_parameters() if "wemoe_router" in n]
    opt = torch.optim.Adam(routers, lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        logits = model(**batch).logits
        p = torch.softmax(logits, -1)
        h = -(p * torch.log_softmax(logits, -1)).sum(-1)
        if h.dim() == 2:  # causal LM: per sequence, the mean over its attended positions
            m = batch["attention_mask"].float()
            h = (h * m).sum(-1) / m.sum(-1)
        loss = h.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_entropy_minimisation_steps_match_a_hand_written_loop(arch):
    start = MAKERS[arch](0).double().eval()  # float64: Adam's first steps amplify rounding of tiny grads
    ends = [_perturbed(start, s) for s in (1, 2)]
    torch.manual_seed(5)
    model = upscale_wemoe(start, ends)
    reference = copy.deepcopy(model)
    batches = [_inputs(1), _inputs(2)]
    batches[1]["attention_mask"][0, 4:] = 0
    history = fit_wemoe_router(model, batches, steps=3, lr=0.05)
    want = _hand_written_entropy_steps(reference, batches, lr=0.05, steps=3)
    assert history == pytest.approx(want, rel=1e-10)
    assert history[0] != history[-1]  # the routers moved
    got = {n: p for n, p in model.named_parameters() if "wemoe_router" in n}
    ref = {n: p for n, p in reference.named_parameters() if "wemoe_router" in n}
    assert got.keys() == ref.keys() and got
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # nothing but the routers changed
    frozen = {n: t for n, t in _state(model).items() if "wemoe_router" not in n}
    want_frozen = {n: t for n, t in _state(reference).items() if "wemoe_router" not in n}
    torch.testing.assert_close(frozen, want_frozen)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_load_round_trip(arch, tmp_path):
    start = MAKERS[arch](0).eval()
    model = upscale_wemoe(start, [_perturbed(start, 1), _perturbed(start, 2)], router_hidden_layers=1)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "WEMoERouter":
                m.fc.weight.normal_(0, 1.0)
    save_wemoe(model, tmp_path / "moe")
    loaded = load_wemoe(tmp_path / "moe").eval()
    assert type(loaded) is type(model)
    assert wemoe_options(loaded) == wemoe_options(model)
    batch = _inputs(3)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        save_wemoe(model, tmp_path / "moe")


def test_a_bfloat16_model_loads_back_in_bfloat16(tmp_path):
    start = tiny_llama(0).to(torch.bfloat16)
    model = upscale_wemoe(start, [_perturbed(start, 1)])
    save_wemoe(model, tmp_path / "moe")
    loaded = load_wemoe(tmp_path / "moe")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    batch = _inputs(4)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)


class Wrapper(nn.Module):
    """A model that is not a transformers class around a BERT encoder (like robustft's SentenceClassifier)."""

    def __init__(self, seed=0):
        super().__init__()
        self.encoder = tiny_bert(seed).bert
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def test_a_wrapped_encoder_is_upscaled_trained_saved_and_loaded_into_a_given_model(tmp_path):
    start = Wrapper().eval()
    end = _perturbed(start, 1)
    batches = [_inputs(1), _inputs(2)]
    model = fit_wemoe(start, end, batches, steps=2, lr=1e-2)  # K=1: WiSE-FT's two endpoints
    assert wemoe_options(model)["experts"] == 1
    save_wemoe(model, tmp_path / "moe")
    with pytest.raises(ValueError, match="not a transformers model"):
        load_wemoe(tmp_path / "moe")
    loaded = load_wemoe(tmp_path / "moe", model=Wrapper(7)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]), model(**batches[0]), rtol=0, atol=0)


def test_gpt2_is_a_causal_lm_so_it_routes_per_token_by_default():
    from robustft.core.model import is_causal_lm

    # GPT2LMHeadModel is not named ...ForCausalLM: it was taken for a classifier (sequence routing, which lets
    # a position see later tokens, and no next-token shift of the entropy mask)
    assert is_causal_lm(tiny_gpt2()) and is_causal_lm(tiny_llama()) and not is_causal_lm(tiny_bert())
    assert wemoe_options(upscale_wemoe(tiny_gpt2(0), [tiny_gpt2(1)]))["routing"] == "token"
    assert wemoe_options(upscale_wemoe(tiny_bert(0), [tiny_bert(1)]))["routing"] == "sequence"


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    start = tiny_llama(0)
    with pytest.raises(ValueError, match="at least one expert"):
        upscale_wemoe(start, [])
    with pytest.raises(ValueError, match="Sequential"):
        upscale_wemoe(nn.Sequential(nn.Linear(4, 4)), [nn.Sequential(nn.Linear(4, 4))])
    other = tiny_llama(1)
    other.model.layers[0].mlp.up_proj = nn.Linear(16, 24, bias=False)
    with pytest.raises(ValueError, match=r"task vector 1, tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        upscale_wemoe(start, [tiny_llama(2), other])
    with pytest.raises(ValueError, match="routing"):
        upscale_wemoe(start, [tiny_llama(1)], routing="batch")
    with pytest.raises(ValueError, match="router_hidden_layers"):
        upscale_wemoe(start, [tiny_llama(1)], router_hidden_layers=3)
    model = upscale_wemoe(start, [tiny_llama(1)])
    with pytest.raises(ValueError, match="already upscaled"):
        upscale_wemoe(model, [tiny_llama(1)])
    with pytest.raises(ValueError, match="not a WEMoE model"):
        fit_wemoe_router(start, [_inputs()], steps=1)
    with pytest.raises(FileNotFoundError, match="wemoe.json"):
        load_wemoe(tmp_path)


@pytest.mark.skipif(not os.environ.get("FUSION_BENCH_DIR"),
                    reason="FUSION_BENCH_DIR (see tests/merge/test_fusionbench.py) not set")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlp_block_equals_fusionbench_weight_ensembling_moe(arch):
    """FusionBench's ``WeightEnsemblingMoE`` (models/we_moe.py) merges a state dict per sample and calls the
    block through functional_call; with the same router weights its output is ours (per-sequence routing)."""
    from tests.merge.fusionbench import load_module as _load

    fb = _load("fb_we_moe", "models/we_moe.py", needs=(("fusion_bench.models.utils", "models/utils.py"),))
    start = MAKERS[arch](0).double().eval()
    ends = [_perturbed(start, s) for s in (1, 2, 3)]
    model = upscale_wemoe(start, ends, routing="sequence", router_hidden_layers=2)

    def block(m):
        return m.model.layers[1].mlp if arch == "llama" else m.transformer.h[1].mlp

    ours = block(model)
    with torch.no_grad():
        for p in ours.wemoe_router.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    theirs = fb.WeightEnsemblingMoE(16, copy.deepcopy(block(start)), [copy.deepcopy(block(e)) for e in ends],
                                    batch_first=True, router_hidden_layers=2).double().eval()
    theirs.gate.load_state_dict(ours.wemoe_router.state_dict())
    h = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(h), theirs(h), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not os.environ.get("FUSION_BENCH_DIR"),
                    reason="FUSION_BENCH_DIR (see tests/merge/test_fusionbench.py) not set")
@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
def test_router_initialisation_equals_fusionbench_gate(hidden_layers):
    """``WEMoERouter`` is "initialised as FusionBench": from the same torch seed, FusionBench's
    ``construct_weight_ensembling_gate`` (models/we_moe.py) gives the same parameters, bit for bit."""
    from robustft.interpolation.wemoe import WEMoERouter
    from tests.merge.fusionbench import load_module as _load

    fb = _load("fb_we_moe", "models/we_moe.py", needs=(("fusion_bench.models.utils", "models/utils.py"),))
    torch.manual_seed(11)
    theirs = fb.construct_weight_ensembling_gate(16, 3, init_lambda=0.3, num_hidden_layers=hidden_layers)
    torch.manual_seed(11)
    ours = WEMoERouter(16, 3, hidden_layers=hidden_layers, init_lambda=0.3)
    expected = theirs.state_dict()
    got = ours.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.skipif(not os.environ.get("FUSION_BENCH_DIR"),
                    reason="FUSION_BENCH_DIR (see tests/merge/test_fusionbench.py) not set")
def test_defaults_are_fusionbench_weight_ensembling_moe_configuration():
    """docs/dynamic_interpolation.md: the defaults of ``upscale_wemoe``/``fit_wemoe_router`` are FusionBench's
    (its shipped ``method/wemoe/weight_ensembling_moe.yaml``: Adam, lr 1e-4, 1000 steps, two router layers,
    init_lambda 0.3, which it also passes as the task-arithmetic scale of the non-MLP parameters)."""
    import inspect
    from pathlib import Path

    import yaml

    config = Path(os.environ["FUSION_BENCH_DIR"]).parent / "fusion_bench_config/method/wemoe"
    theirs = yaml.safe_load((config / "weight_ensembling_moe.yaml").read_text())
    upscale = inspect.signature(upscale_wemoe).parameters
    fit = inspect.signature(fit_wemoe_router).parameters
    assert upscale["router_hidden_layers"].default == theirs["router_hidden_layers"]
    assert upscale["init_lambda"].default == upscale["scaling_factor"].default == float(theirs["init_lambda"])
    assert fit["steps"].default == theirs["max_steps"]
    assert fit["lr"].default == float(theirs["lr"])
    assert fit["optimizer"].default == theirs["optimizer"]
