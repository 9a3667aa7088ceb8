"""``robustft report``'s engine on tiny Llamas: every point of the curve equals a model built densely at θ(α)
(an adapter merged by PEFT, or two state dicts interpolated by hand) scored against a separately loaded
base; α* is the best in-distribution loss; the outputs and the reuse of the retention set."""

import json

import pytest
import torch

from robustft.analysis import report, retention
from tests.analysis.retention_helpers import (
    ID_ROWS,
    PROMPTS,
    SHIFT_ROWS,
    TEMPLATE,
    WORDS,
    save_adapter,
    write_jsonl,
)
from tests.tiny import tiny_llama_folder

ALPHAS = (0.0, 0.5, 1.0)
QUIET = dict(alphas=ALPHAS, max_new_tokens=6, say=lambda *a: None)


@pytest.fixture
def files(tmp_path):
    base = tiny_llama_folder(tmp_path / "base", WORDS, TEMPLATE)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"base": base, "id": write_jsonl(tmp_path / "id.jsonl", ID_ROWS),
            "shift": write_jsonl(tmp_path / "shift.jsonl", SHIFT_ROWS), "prompts": prompts, "tmp": tmp_path}


def dense_scores(model, ref, tok, rows_by_set):
    """Loss per set (and retained KL against ``ref``, a separately loaded base) of ``model``."""
    out = {}
    for name, rows in rows_by_set.items():
        ex = retention.encode_rows(tok, rows)
        s = retention.score_examples(model, ex, ref, kl=name == "retained", batch_size=1, pad_id=2)
        out[name] = (s.loss, s.kl)
    return out


def rows_by_set(files, out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["base"])
    rset = retention.RetentionSet.load(out / "retention.jsonl")
    return {"id": [report.example_of(r) for r in ID_ROWS],
            "shift": [report.example_of(r) for r in SHIFT_ROWS], "retained": rset.model_rows(tok)}


def check_against_dense(result, states, files, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sets = rows_by_set(files, out)
    tok = AutoTokenizer.from_pretrained(files["base"])
    model, base = (AutoModelForCausalLM.from_pretrained(files["base"]) for _ in range(2))
    for i, a in enumerate(ALPHAS):
        model.load_state_dict(states(a))
        ref = dense_scores(model, base, tok, sets)
        for name in ("id", "shift", "retained"):
            assert result.losses[name][i] == pytest.approx(ref[name][0], rel=1e-5), (a, name)
        assert result.retained_kl[i] == pytest.approx(ref["retained"][1], rel=1e-4, abs=1e-7), a
    assert result.retained_kl[0] == pytest.approx(0.0, abs=1e-7)
    assert result.chosen_alpha == ALPHAS[min(range(len(ALPHAS)), key=result.losses["id"].__getitem__)]


def test_adapter_curve_equals_the_merged_adapter_at_each_alpha(files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(files["base"], files["tmp"] / "adapter")
    out = files["tmp"] / "out"
    result = report.run_report(files["base"], files["id"], out, adapter=adapter, shift_path=files["shift"],
                               **QUIET, prompts_path=files["prompts"])
    base_sd = AutoModelForCausalLM.from_pretrained(files["base"]).state_dict()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["base"]), str(adapter))
    end_sd = merged.merge_and_unload().state_dict()  # PEFT's own W0 + s·B·A
    check_against_dense(result, lambda a: {k: base_sd[k] + a * (end_sd[k] - base_sd[k]) for k in base_sd},
                        files, out)
    assert result.losses["retained"][0] < result.losses["retained"][-1]  # the adapter moved away from base


def test_full_model_curve_equals_interpolated_state_dicts(files):
    from transformers import AutoModelForCausalLM

    tuned = tiny_llama_folder(files["tmp"] / "tuned", WORDS, TEMPLATE, seed=5)
    out = files["tmp"] / "out"
    result = report.run_report(files["base"], files["id"], out, model=tuned, shift_path=files["shift"],
                               **QUIET, prompts_path=files["prompts"])
    base_sd = AutoModelForCausalLM.from_pretrained(files["base"]).state_dict()
    end_sd = AutoModelForCausalLM.from_pretrained(tuned).state_dict()
    check_against_dense(result, lambda a: {k: torch.lerp(base_sd[k], end_sd[k], a) for k in base_sd},
                        files, out)


def test_outputs_and_the_retention_set_is_reused(files, monkeypatch):
    adapter = save_adapter(files["base"], files["tmp"] / "adapter")
    out = files["tmp"] / "out"
    kw = dict(adapter=adapter, **QUIET, prompts_path=files["prompts"])
    first = report.run_report(files["base"], files["id"], out, **kw)
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "wise_ft.json", "wise_ft.csv", "retention.jsonl"} <= names
    data = json.loads((out / "report.json").read_text())
    assert data["chosen_alpha"] == first.chosen_alpha and data["losses"]["id"] == first.losses["id"]
    assert len(data["retained_items"][f"alpha={first.chosen_alpha:g}"]["loss"]) == data["n_items"]["retained"]
    assert "shift" not in data["losses"]
    assert "α* (chosen on id only)" in (out / "report.md").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        report.run_report(files["base"], files["id"], out, **kw)
    monkeypatch.setattr(retention, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    again = report.run_report(files["base"], files["id"], out, overwrite=True, **kw)
    assert again.losses == first.losses


@pytest.mark.parametrize("row, why", [
    ({"text": "hi"}, "expected one of"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "expected one of"),  # no assistant answer
    ({"prompt": "a", "completion": 3}, "expected one of"),
    ("just a string", "expected one of"),
])
def test_other_row_shapes_are_refused_with_file_and_line(tmp_path, row, why):
    path = write_jsonl(tmp_path / "d.jsonl", [ID_ROWS[0], row])
    with pytest.raises(ValueError, match=rf"--id .*d.jsonl:2: {why}"):
        report.read_examples(path)


def test_plain_and_chat_rows_become_prompt_completion_examples():
    assert report.example_of({"prompt": "Q\n", "completion": "A"}) == {"prompt": "Q\n", "completion": "A"}
    assert report.example_of(ID_ROWS[0]) == {"prompt": ID_ROWS[0]["messages"][:1],
                                             "completion": ID_ROWS[0]["messages"][1:]}


def test_alpha_star_against_the_fine_tuned_model_gets_paired_intervals(files, monkeypatch):
    """The report's differences are the per-item means of α* minus α=1 over the same items (recomputed
    here from the per-item values it stores) with the paired bootstrap's interval (issue 24 item 5)."""
    import numpy as np

    from robustft.interpolation import wise_ft
    from robustft.ops.bootstrap import paired_bootstrap

    monkeypatch.setattr(wise_ft, "choose_alpha", lambda alphas, values, **kw: 0.5)
    adapter = save_adapter(files["base"], files["tmp"] / "adapter")
    out = files["tmp"] / "out"
    result = report.run_report(files["base"], files["id"], out, adapter=adapter, shift_path=files["shift"],
                               prompts_path=files["prompts"], **QUIET)
    assert set(result.differences) == {"id loss", "shift loss", "retained loss", "retained KL"}
    at, end = result.retained_items["alpha=0.5"], result.retained_items["alpha=1"]
    got = result.differences["retained loss"]
    assert got["difference"] == pytest.approx(float(np.mean(np.subtract(at["loss"], end["loss"]))), rel=1e-6)
    want = paired_bootstrap(at["kl"], end["kl"], seed=0)
    assert (result.differences["retained KL"]["low"], result.differences["retained KL"]["high"]) == (
        want.low, want.high)
    assert got["n"] == result.n_items["retained"] and result.differences["id loss"]["n"] == len(ID_ROWS)
    text = (out / "report.md").read_text()
    assert "α*=0.5 minus the fine-tuned model (α=1)" in text and f"(n = {got['n']} items" in text
    assert json.loads((out / "report.json").read_text())["differences"]["retained loss"] == got


def test_a_saved_set_is_reused_with_its_own_settings_and_checked_against_the_base(files, monkeypatch):
    """A set built with other prompts, answer limit and batch size (as ``demo --llm`` builds its own) is
    reused as it is when --prompts / --max-new-tokens are not given; given ones must match it; a set from
    other weights is refused."""
    saved = files["tmp"] / "demo-set.jsonl"
    rset = retention.build_retention_set(files["base"], PROMPTS[:5], saved, max_new_tokens=6, batch_size=5)
    adapter = save_adapter(files["base"], files["tmp"] / "adapter")
    monkeypatch.setattr(retention, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    kw = dict(adapter=adapter, retention_path=saved, alphas=ALPHAS, say=lambda *a: None)
    result = report.run_report(files["base"], files["id"], files["tmp"] / "out", **kw)
    assert result.n_items["retained"] == len(rset.rows) and result.inputs["max_new_tokens"] == 6
    assert result.inputs["prompts"] == "the retention set's"
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens differ\)"):
        report.run_report(files["base"], files["id"], files["tmp"] / "o2", max_new_tokens=7, **kw)
    with pytest.raises(ValueError, match=r"other settings \(prompts differ\)"):
        report.run_report(files["base"], files["id"], files["tmp"] / "o3", prompts_path=files["prompts"],
                          **kw)
    head, *rows = saved.read_text().splitlines()
    other = json.loads(head)
    other["model"]["weights_sha256"] = "0" * 64
    saved.write_text("\n".join([json.dumps(other), *rows]) + "\n")
    with pytest.raises(ValueError, match="built from another model"):
        report.run_report(files["base"], files["id"], files["tmp"] / "o4", **kw)
    assert not any((files["tmp"] / o).exists() for o in ("o2", "o3", "o4"))


def test_an_adapter_report_runs_one_forward_pass_per_batch_and_alpha(files):
    """Cost claim of the module docstring: per batch, the base pass (KL reference and α = 0, where B = 0)
    runs once and each α > 0 once, so a 3-α grid costs 3 passes per batch, not 3 + 3 for the KL; the
    curve equals scoring each α alone (score_examples, its own base pass); B comes back bit-exactly."""
    from transformers import AutoTokenizer

    adapter = save_adapter(files["base"], files["tmp"] / "adapter")
    interp = report.adapter_interpolation(files["base"], adapter)
    tok = AutoTokenizer.from_pretrained(files["base"])
    examples = {"id": retention.encode_rows(tok, [report.example_of(r) for r in ID_ROWS]),
                "retained": retention.encode_rows(tok, [report.example_of(r) for r in SHIFT_ROWS])}
    params = [p for n, p in interp.model.named_parameters() if "lora_B" in n]
    end = [p.detach().clone() for p in params]
    calls = []
    hook = interp.model.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = report.wise_ft_report(interp, examples, ALPHAS, batch_size=2, pad_id=2)
    finally:
        hook.remove()
    assert all(torch.equal(p, e) for p, e in zip(params, end))
    batches = sum(-(-len(ex) // 2) for ex in examples.values())
    assert len(calls) == batches * len(ALPHAS)
    for i, a in enumerate(ALPHAS):  # each α by hand: B ← α·B, scored alone with its own base pass
        for p, e in zip(params, end):
            p.data.copy_(a * e)
        for name, ex in examples.items():
            s = retention.score_examples(interp.model, ex, kl=name == "retained", batch_size=2, pad_id=2)
            assert got.losses[name][i] == pytest.approx(s.loss, rel=1e-6), (name, a)
        assert got.retained_kl[i] == pytest.approx(s.kl, rel=1e-5, abs=1e-8), a
    assert got.retained_kl[0] == 0.0  # α = 0 is the base pass itself
