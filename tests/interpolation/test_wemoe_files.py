"""``load_wemoe`` on corrupted or foreign folders: a WEMoEFormatError (a ValueError) naming the file and what
is wrong, never a raw KeyError / JSONDecodeError / ModuleNotFoundError / TypeError (issue 22, item 9)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from robustft.interpolation.wemoe import WEMoEFormatError, load_wemoe, save_wemoe, upscale_wemoe
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wemoe") / "moe"
    start = tiny_llama(0)
    save_wemoe(upscale_wemoe(start, [tiny_llama(1)]), folder)
    return folder


def _meta(folder, **changes):
    meta = json.loads((folder / "wemoe.json").read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is DROP]:
        del meta[key]
    (folder / "wemoe.json").write_text(json.dumps(meta))


DROP = object()
NOT_IMPORTED = "transformers.robustft_never_imports_this"


@pytest.mark.parametrize(
    "corrupt, file, what",
    [
        (lambda f: (f / "wemoe.json").write_text("{"), "wemoe.json", "not JSON"),
        (lambda f: (f / "wemoe.json").write_bytes(b"\xff\xfe"), "wemoe.json", "not JSON"),
        (lambda f: (f / "wemoe.json").write_text("[]"), "wemoe.json", "not a robustft-wemoe"),
        (lambda f: _meta(f, experts=DROP), "wemoe.json", "no 'experts'"),
        (lambda f: _meta(f, blocks=DROP), "wemoe.json", "no 'blocks'"),
        (lambda f: _meta(f, experts="2"), "wemoe.json", "experts must be a finite integer"),
        (lambda f: _meta(f, experts=True), "wemoe.json", "experts must be a finite integer"),
        (lambda f: _meta(f, routing="batch"), "wemoe.json", "routing must be one of"),
        (lambda f: _meta(f, router_hidden_layers=5), "wemoe.json", "router_hidden_layers must be one of"),
        (lambda f: _meta(f, init_lambda="x"), "wemoe.json", "init_lambda must be a finite number"),
        (lambda f: _meta(f, blocks="model.layers.0"), "wemoe.json", "blocks must be a list"),
        (lambda f: _meta(f, dtype="load"), "wemoe.json", "dtype must name a floating torch dtype"),
        (lambda f: _meta(f, dtype="int64"), "wemoe.json", "dtype must name a floating torch dtype"),
        (lambda f: _meta(f, model_class=7), "wemoe.json", "model_class must be a dotted class name"),
        (lambda f: _meta(f, model_class=f"{NOT_IMPORTED}.LlamaForCausalLM"), "wemoe.json",
         "is not a transformers model class"),
        (lambda f: _meta(f, model_class="transformers.models.nope.NopeModel"), "wemoe.json",
         "is not a transformers model class"),
        (lambda f: _meta(f, model_class="transformers.models.llama.configuration_llama.LlamaConfig"),
         "wemoe.json", "is not a transformers model class"),
        (lambda f: _meta(f, model_class="transformers.models.bert.modeling_bert.BertModel"), "config.json",
         "not the BertConfig"),
        (lambda f: (f / "config.json").unlink(), "config.json", "not a transformers config"),
        (lambda f: (f / "config.json").write_text("{"), "config.json", "not a transformers config"),
        (lambda f: (f / "wemoe.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
         "wemoe.safetensors", "cannot be read"),
        (lambda f: (f / "wemoe.safetensors").write_bytes(b"nope"), "wemoe.safetensors", "cannot be read"),
        (lambda f: _meta(f, experts=3), "wemoe.safetensors", "cannot be read"),  # (3, ...) vs saved (1, ...)
    ],
)
def test_a_corrupted_or_foreign_folder_is_a_named_error(saved, tmp_path, corrupt, file, what):
    folder = tmp_path / "moe"
    shutil.copytree(saved, folder)
    corrupt(folder)
    with pytest.raises(WEMoEFormatError, match=rf"{folder / file}\b.*{what}") as err:
        load_wemoe(folder)
    assert isinstance(err.value, ValueError)
    assert NOT_IMPORTED not in sys.modules


def test_the_intact_folder_still_loads(saved):
    model = load_wemoe(saved)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
