"""Merge inputs that used to pass silently: named errors before anything is written (issue 22, item 7)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from robustft.cli import main
from robustft.merge import io as merge_io
from robustft.merge.io import CheckpointReader
from tests.merge.tiny_models import save_model, tiny_config


def _llama(path, **config):
    torch.manual_seed(0)
    return save_model(LlamaForCausalLM(tiny_config(**config)), path)


def _stack(tmp_path, first, second, capsys):
    """``robustft merge`` of passthrough slices [first 0-2, second 0-2]: (exit code, stderr)."""
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(first), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(second), "layer_range": [0, 2]}]}]}  # fmt: skip
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    code = main(["merge", str(tmp_path / "stack.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "other, message",
    [
        ({"intermediate": 48}, "tensor 'model.layers.2.mlp.down_proj.weight': shape (32, 48)"),
        ({"hidden": 16}, "tensor 'model.layers.2.input_layernorm.weight': shape (16,)"),
        ({"vocab": 96}, "tensor 'lm_head.weight': shape (96, 32)"),
    ],
)
def test_stacking_layers_of_different_widths_is_refused_before_writing(tmp_path, capsys, other, message):
    """The stack keeps the first model's config: layers (or a head) of another width would give a model that
    ``from_pretrained`` cannot load, so it is a named error and nothing is written."""
    a = _llama(tmp_path / "a")
    b = _llama(tmp_path / "b", **other)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # what the unchecked stack would give
        LlamaForCausalLM.from_pretrained(b, config=tiny_config(layers=2))
    code, err = _stack(tmp_path, a, b, capsys)
    assert code == 2 and err.startswith("robustft merge: error: tensor "), err
    assert message in err and "different widths" in err, err
    assert not (tmp_path / "out").exists()


def test_stacking_layers_of_the_same_width_still_loads(tmp_path, capsys):
    a, b = _llama(tmp_path / "a"), _llama(tmp_path / "b")
    assert _stack(tmp_path, a, b, capsys)[0] == 0
    assert LlamaForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4


OUTSIDE = ["../outside/model.safetensors", "ABSOLUTE", "sub/../../outside/model.safetensors",
           "..\\outside\\model.safetensors"]


@pytest.mark.parametrize("where", OUTSIDE)
def test_a_shard_index_pointing_outside_the_folder_is_refused_before_reading_it(tmp_path, monkeypatch, where):
    outside = tmp_path / "outside" / "model.safetensors"
    outside.parent.mkdir()
    save_file({"w": torch.ones(2)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"b": torch.zeros(2)}, folder / "model-00001-of-00002.safetensors")
    target = str(outside) if where == "ABSOLUTE" else where
    index = {"metadata": {}, "weight_map": {"b": "model-00001-of-00002.safetensors", "w": target}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    read = []
    original = merge_io.read_safetensors_header
    monkeypatch.setattr(merge_io, "read_safetensors_header", lambda f: read.append(f) or original(f))
    with pytest.raises(ValueError, match=r"index\.json: tensor 'w' is mapped to .* outside "):
        CheckpointReader(folder)
    assert read == []  # no header read at all, the outside one least of all


def test_a_shard_index_inside_the_folder_still_reads(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    save_file({"b": torch.zeros(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"w": torch.ones(2)}, folder / "sub" / "model-00002-of-00002.safetensors")
    weight_map = {"b": "model-00001-of-00002.safetensors", "w": "sub/model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = CheckpointReader(folder)
    assert torch.equal(reader.get("w"), torch.ones(2)) and torch.equal(reader.get("b"), torch.zeros(2))
