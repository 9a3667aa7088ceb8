"""Retention sets: built from the base model's own greedy answers (checked against a hand greedy loop),
saved and reused only for the same weights and settings, scored by answer-token loss (a hand loop) and
KL to base (dense, from two separately loaded models; PEFT's disabled adapter equals a separate base)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustft.analysis import retention
from tests.analysis.retention_helpers import PROMPTS, ROWS, TEMPLATE, WORDS
from tests.tiny import tiny_llama_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["chat", "plain"])
def model_dir(request, tmp_path):
    return tiny_llama_folder(tmp_path / "base", WORDS, TEMPLATE if request.param == "chat" else None)


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def hand_ids(tok, question, answer=None):
    """Token ids written out by hand: the template's text, or the plain prompt, answer and EOS."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    ids = lambda text: [vocab[w] for w in text.split()]  # noqa: E731
    if tok.chat_template:
        prompt = ids(f"user : {question} </s> assistant :")
        return prompt, (None if answer is None else ids(f"{answer} </s>"))
    return ids(question), (None if answer is None else ids(answer) + [vocab["</s>"]])


def test_general_prompts_are_100_distinct_and_begin_with_the_demos():
    from robustft.demos import llm as demo_llm

    prompts = retention.general_prompts()
    assert len(prompts) == len(set(prompts)) == 100
    assert demo_llm.GENERAL_PROMPTS == prompts[:32]


@pytest.mark.slow  # builds a wheel (setuptools, about 10 s)
def test_a_clean_install_ships_the_prompt_list(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("robustft-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        text = z.read("robustft/analysis/general_prompts.txt").decode()
    assert retention.general_prompts()[0] in text


def test_answers_are_the_models_greedy_answers(model_dir):
    """generate_answers (left-padded batches) gives what a hand argmax loop over one sequence gives."""
    model, tok = load(model_dir)
    end = retention.end_of_answer_id(tok, model_dir)
    answers = retention.generate_answers(model, tok, PROMPTS, max_new_tokens=6, end_id=end, batch_size=3)
    for question, answer in zip(PROMPTS, answers):
        ids, _ = hand_ids(tok, question)
        out = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == end:
                    break
                out.append(nxt)
            else:
                out = None
        assert answer == (None if out is None else " ".join(WORDS[i] for i in out)), question
    assert any(a is not None for a in answers)
    if not tok.chat_template:  # this seed's plain model also leaves one unfinished
        assert answers[-1] is None


def test_set_round_trips_through_jsonl_and_is_reused(model_dir, tmp_path, monkeypatch):
    path = tmp_path / "sets" / "retention.jsonl"
    built = retention.build_retention_set(model_dir, PROMPTS, path, max_new_tokens=6, batch_size=3)
    head, *rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert head["model"] == retention.model_identity(model_dir) and head["settings"]["max_new_tokens"] == 6
    assert rows == built.rows and len(rows) + len(head["unfinished"]) == len(PROMPTS)
    assert retention.RetentionSet.load(path) == built
    monkeypatch.setattr(retention, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    assert retention.build_retention_set(model_dir, PROMPTS, path, max_new_tokens=6, batch_size=3) == built


def test_building_is_deterministic(model_dir, tmp_path):
    a = retention.build_retention_set(model_dir, PROMPTS, tmp_path / "a.jsonl", max_new_tokens=6)
    b = retention.build_retention_set(model_dir, PROMPTS, tmp_path / "b.jsonl", max_new_tokens=6)
    assert a == b and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_a_set_of_other_weights_or_settings_is_refused(tmp_path):
    folder = tiny_llama_folder(tmp_path / "base", WORDS, TEMPLATE)
    path = tmp_path / "r.jsonl"
    built = retention.build_retention_set(folder, PROMPTS, path, max_new_tokens=6)
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        retention.build_retention_set(folder, PROMPTS, path, max_new_tokens=7)
    with pytest.raises(ValueError, match="other settings.*prompts"):
        retention.build_retention_set(folder, PROMPTS[:3], path, max_new_tokens=6)
    tiny_llama_folder(folder, WORDS, TEMPLATE, seed=3)  # other weights in the same folder
    before = path.read_bytes()
    with pytest.raises(ValueError, match="another model.*weights_sha256"):
        retention.build_retention_set(folder, PROMPTS, path, max_new_tokens=6)
    assert path.read_bytes() == before  # refused: nothing written
    rebuilt = retention.build_retention_set(folder, PROMPTS, path, max_new_tokens=6, rebuild=True)
    assert rebuilt.model["weights_sha256"] != built.model["weights_sha256"]
    assert retention.RetentionSet.load(path) == rebuilt


def test_a_file_that_is_not_a_retention_set_is_named(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: not a robustft retention set"):
        retention.RetentionSet.load(bad)
    head = json.dumps({"robustft_retention_set": 1, "model": {}, "settings": {}})
    bad.write_text(head + '\n{"prompt": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: expected a row"):
        retention.RetentionSet.load(bad)


def hand_scores(model, reference, tok):
    """Per row, unpadded: mean answer-token NLL and mean KL(p_ref || p_model), written out densely."""
    losses, kls = [], []
    with torch.no_grad():
        for q, a in ROWS:
            prompt, answer = hand_ids(tok, q, a)
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0].float()
            pos = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
            nll = [F.cross_entropy(logits[t], ids[0, t + 1]).item() for t in pos]
            losses.append(sum(nll) / len(nll))
            if reference is not None:
                ref = reference(input_ids=ids).logits[0].float()
                kl = [sum(p * (torch.log(p) - torch.log(q_))
                          for p, q_ in zip(ref[t].softmax(-1), logits[t].softmax(-1))).item() for t in pos]
                kls.append(sum(kl) / len(kl))
    return losses, kls


def rows_for(tok):
    return [retention.model_row(tok, q, a) for q, a in ROWS]


def test_loss_and_kl_equal_a_dense_hand_computation_from_two_models(model_dir, tmp_path):
    tuned_dir = tiny_llama_folder(tmp_path / "tuned", WORDS, seed=5)  # another model: the "fine-tuned" one
    base, tok = load(model_dir)
    tuned, _ = load(tuned_dir)
    scores = retention.score_retention(tuned, tok, rows_for(tok), reference=base, batch_size=2)
    losses, kls = hand_scores(tuned, base, tok)
    tokens = [len(hand_ids(tok, q, a)[1]) for q, a in ROWS]
    assert scores.tokens == tokens
    assert scores.item_loss == pytest.approx(losses, rel=1e-5)
    assert scores.item_kl == pytest.approx(kls, rel=1e-4, abs=1e-7)
    assert scores.loss == pytest.approx(sum(x * n for x, n in zip(losses, tokens)) / sum(tokens), rel=1e-5)
    assert scores.kl == pytest.approx(sum(x * n for x, n in zip(kls, tokens)) / sum(tokens), rel=1e-4)
    assert min(kls) > 0
    same = retention.score_retention(base, tok, rows_for(tok), reference=base)
    assert same.kl == pytest.approx(0.0, abs=1e-6)


def test_kl_of_a_full_model_needs_the_reference(model_dir):
    model, tok = load(model_dir)
    with pytest.raises(ValueError, match="reference"):
        retention.score_retention(model, tok, rows_for(tok))
    assert retention.score_retention(model, tok, rows_for(tok), kl=False).kl is None


def test_peft_kl_with_the_adapter_disabled_equals_a_separately_loaded_base(model_dir):
    from peft import LoraConfig, get_peft_model

    model, tok = load(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # B != 0: the adapter changes the model
    peft = get_peft_model(model, config)
    separate, _ = load(model_dir)
    peft.train()
    own = retention.score_retention(peft, tok, rows_for(tok), batch_size=2)
    ref = retention.score_retention(peft, tok, rows_for(tok), reference=separate, batch_size=2)
    assert own.kl > 1e-4
    assert own.item_kl == pytest.approx(ref.item_kl, rel=1e-6, abs=1e-9)
    assert own.item_loss == ref.item_loss
    assert peft.active_adapters == ["default"] and all(m.training for m in peft.modules())  # modes restored


def test_logits_only_at_answer_positions_equal_the_full_logits(model_dir, monkeypatch):
    """The Llama path projects only the answer positions onto the vocabulary (``logits_to_keep`` mask,
    checked to be taken: the lm_head sees only them); its scores equal slicing the full logits."""
    from peft import LoraConfig, get_peft_model

    model, tok = load(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                            init_lora_weights=False))
    assert retention._keeps_masked_logits(type(peft.get_base_model()))
    seen = []
    hook = peft.get_base_model().lm_head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    try:
        sliced = retention.score_retention(peft, tok, rows_for(tok), batch_size=3)
    finally:
        hook.remove()
    answer_tokens = sum(sliced.tokens)
    assert sum(seen) == 2 * answer_tokens  # the model's pass and the base pass (KL), answer rows only
    monkeypatch.setattr(retention, "_keeps_masked_logits", lambda cls: False)
    full = retention.score_retention(peft, tok, rows_for(tok), batch_size=3)
    assert sliced.item_loss == pytest.approx(full.item_loss, rel=1e-6)
    assert sliced.item_kl == pytest.approx(full.item_kl, rel=1e-5, abs=1e-8)
