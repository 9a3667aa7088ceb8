"""Model soups against independent references: Alg. 1 of Wortsman et al. written out by hand (brute force on
tiny models, scored by a callable and by a Trainer dataset), the dense torch mean, ``robustft average``, and
for PEFT adapters the mean of the deltas as PEFT itself merges them."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer

from robustft.cli import main
from robustft.interpolation.soup import SoupIngredients, soup_model, trainer_scorer, write_uniform_soup
from tests.tiny import tiny_bert, tiny_llama, token_dataset, training_args


def _candidates(k=5, seed=0):
    """K state dicts of one tiny BERT: the start plus different random moves (fine-tuning stand-ins)."""
    base = tiny_bert(seed).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    return [
        {
            n: t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
            for n, t in base.items()
        }
        for _ in range(k)
    ]


def _mean(states, names=None):
    names = names or [n for n, t in states[0].items() if t.is_floating_point()]
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in names}


def _hand_greedy(states, score_of, greater=True):
    """Alg. 1 of the paper, written out: sort by ID score, keep a candidate if the soup's ID does not drop."""
    sign = 1 if greater else -1
    alone = [score_of(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -sign * alone[i])
    kept, best = [order[0]], alone[order[0]]
    for i in order[1:]:
        trial = score_of(_mean([states[j] for j in [*kept, i]]))
        if sign * trial >= sign * best:
            kept, best = [*kept, i], trial
    return kept, best


def _target_score(target):
    """An ID score of weights, minus the distance to ``target``: some candidates help, some do not."""

    def score(state):
        return -sum(float((state[n] - target[n]).pow(2).sum()) for n in target)

    return score


def test_greedy_soup_is_algorithm_1_of_the_paper():
    states = _candidates(6)
    # the target: near the mean of three of them, so the greedy soup keeps some and drops others
    target = {n: t + 0.02 for n, t in _mean(states[:3]).items()}
    ref_score = _target_score(target)
    kept, best = _hand_greedy(states, ref_score)
    assert 1 < len(kept) < len(states), kept  # the case decides something
    model = tiny_bert(0)

    def score(m):
        live = m.state_dict()
        return {"id": ref_score(live), "other": float(live["classifier.weight"].sum())}

    result = soup_model(model, states, score, "greedy", names=[f"c{i}" for i in range(6)], progress=False)
    assert result.kept == [f"c{i}" for i in kept]
    assert result.soup["id"] == pytest.approx(best, rel=1e-6)
    want = _mean([states[i] for i in kept])
    got = model.state_dict()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    # every step tried in the order of the ID scores alone, the uniform soup of all reported
    assert [s["tried"] for s in result.steps] == result.order
    assert result.evaluations == 6 + 5 + 1
    assert result.uniform["id"] == pytest.approx(ref_score(_mean(states)), rel=1e-6)
    assert "other" in result.soup and "greedy" in result.table()


def test_greedy_soup_scored_by_a_trainer_dataset(tmp_path):
    states = _candidates(3, seed=3)
    data = token_dataset(32, seed=5)
    model = tiny_bert(3)
    trainer = Trainer(model=model, args=training_args(tmp_path), eval_dataset=data)

    ref_model = tiny_bert(3)
    ref_trainer = Trainer(model=ref_model, args=training_args(tmp_path / "ref"))

    def ref_loss(state):
        ref_model.load_state_dict({**ref_model.state_dict(), **state})
        return ref_trainer.evaluate(eval_dataset=data)["eval_loss"]

    kept, best = _hand_greedy(states, ref_loss, greater=False)
    score = trainer_scorer(trainer, {"id": data, "shifted": token_dataset(32, seed=9)}, metric="loss")
    result = soup_model(
        trainer.model,
        states,
        score,
        "greedy",
        names=list("abc"),
        greater_is_better=False,
        metric="loss",
        evaluate_uniform=False,
        progress=False,
    )
    assert result.kept == ["abc"[i] for i in kept] and result.evaluations == 3 + 2
    assert result.soup["id"] == pytest.approx(best, rel=1e-5)
    assert set(result.soup) == {"id", "shifted"}
    paths = result.save(tmp_path / "report")
    assert [p.name for p in paths][:2] == ["soup.json", "soup.csv"]
    assert json.loads(paths[0].read_text())["kept"] == result.kept


def _saved(tmp_path, k=3):
    folders = []
    for i in range(k):
        tiny_llama(seed=i).save_pretrained(tmp_path / f"ft-{i}")
        folders.append(tmp_path / f"ft-{i}")
    return folders


def _file_weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_uniform_soup_is_the_dense_mean_and_robustft_average(tmp_path):
    folders = _saved(tmp_path)
    ref = _mean([_file_weights(f) for f in folders])
    model = tiny_llama(seed=7)
    result = soup_model(model, folders, method="uniform", progress=False)
    assert result.kept == ["ft-0", "ft-1", "ft-2"] and result.evaluations == 0
    live = model.state_dict()
    for n in ref:
        torch.testing.assert_close(live[n], ref[n], atol=1e-7, rtol=1e-6)
    written = write_uniform_soup(folders, tmp_path / "soup", progress=False)
    assert not written.adapters
    assert main(["average", *map(str, folders), "--out", str(tmp_path / "avg"), "--no-progress"]) == 0
    assert main(["soup", *map(str, folders), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    for out in ("soup", "avg", "cli"):
        got = _file_weights(tmp_path / out)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(got[n], live[n], atol=1e-7, rtol=1e-6)


def _adapters(tmp_path, k=3):
    folders = []
    for seed in range(k):
        base = tiny_llama()
        torch.manual_seed(100 + seed)  # after tiny_llama, which seeds itself: each adapter its own factors
        peft = get_peft_model(
            base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft.save_pretrained(tmp_path / f"adapter-{seed}")
        folders.append(tmp_path / f"adapter-{seed}")
    return folders


def _peft_merged(folder):
    """The base with the adapter merged by PEFT itself (the independent reference)."""
    return PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload().state_dict()


def test_lora_soup_is_the_mean_of_the_deltas(tmp_path):
    folders = _adapters(tmp_path)
    merged = [_peft_merged(f) for f in folders]
    ref = _mean(merged)  # W0 + mean ΔW: the mean of the merged models, as PEFT merges each
    base = tiny_llama()
    soup_model(base, folders, method="uniform", progress=False)
    live = base.state_dict()
    for n in ref:
        torch.testing.assert_close(live[n], ref[n], atol=1e-6, rtol=1e-5)
    # averaging the factors A and B one by one is not the mean of the deltas: the case tells them apart
    naive = {}
    for f in folders:
        for k, v in load_file(f / "adapter_model.safetensors").items():
            naive[k] = naive.get(k, 0) + v / len(folders)
    q = "model.layers.0.self_attn.q_proj.weight"
    a = naive["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = naive["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not torch.allclose(tiny_llama().state_dict()[q] + 2.0 * b @ a, ref[q], atol=1e-4)
    # written to disk: the concatenated-rank adapter computes the same, loaded by PEFT
    write_uniform_soup(folders, tmp_path / "soup")
    got = _peft_merged(tmp_path / "soup")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)


def test_greedy_soup_of_adapters_follows_algorithm_1(tmp_path):
    folders = _adapters(tmp_path, k=4)
    merged = [_peft_merged(f) for f in folders]
    target = {n: t + 0.01 for n, t in _mean(merged[1:3]).items()}
    ref_score = _target_score(target)
    kept, best = _hand_greedy(merged, ref_score)
    base = tiny_llama()
    result = soup_model(base, folders, lambda m: ref_score(m.state_dict()), "greedy", progress=False)
    assert result.kept == [f"adapter-{i}" for i in kept]
    assert result.soup["id"] == pytest.approx(best, rel=1e-5)


def test_a_failing_score_puts_the_weights_back():
    states = _candidates(3)
    model = tiny_bert(0)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def score(m):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("evaluation failed")
        return 1.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        soup_model(model, states, score, "greedy", progress=False)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_bad_input_is_named(tmp_path):
    states = _candidates(2)
    model = tiny_bert(0)
    bad_shape = copy.deepcopy(states[1])
    bad_shape["classifier.weight"] = torch.zeros(3, 16)
    missing = {n: t for n, t in states[1].items() if n != "classifier.bias"}
    extra = {**states[1], "not.in.model": torch.zeros(2)}
    cases = [
        (lambda: SoupIngredients(model, [states[0], bad_shape]), "classifier.weight"),
        (lambda: SoupIngredients(model, [states[0], missing]), "classifier.bias"),
        (
            lambda: SoupIngredients(model, [extra, {**states[0], "not.in.model": torch.zeros(2)}]),
            "not.in.model",
        ),
        (lambda: SoupIngredients(model, []), "no candidates"),
        (lambda: soup_model(model, states, None, "greedy"), "score"),
        (lambda: soup_model(model, states, lambda m: 1.0, "best"), "best"),
        (lambda: soup_model(model, states, lambda m: {"ood": 1.0}, "greedy", progress=False), "'id'"),
        (lambda: soup_model(model, states, lambda m: "high", "greedy", progress=False), "number"),
        (lambda: SoupIngredients(model, states, names=["a", "a"]), "distinct"),
    ]
    before = copy.deepcopy(model.state_dict())
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    folders = _adapters(tmp_path, k=2)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="base model"):
        SoupIngredients(peft, folders)
    tiny_llama().save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="not both"):
        write_uniform_soup([folders[0], tmp_path / "full"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bfloat16_checkpoints_are_souped_in_the_models_dtype(tmp_path):
    """Candidates saved in bfloat16 are averaged in the live float32 tensors (the engine's compute dtype)."""
    states = [
        {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in s.items()}
        for s in _candidates(3)
    ]
    model = tiny_bert(0)
    soup_model(model, states, method="uniform", progress=False)
    want = _mean([{n: t.float() if t.is_floating_point() else t for n, t in s.items()} for s in states])
    live = model.state_dict()
    for n in want:
        assert live[n].dtype == torch.float32
        torch.testing.assert_close(live[n], want[n], atol=1e-6, rtol=1e-6)
