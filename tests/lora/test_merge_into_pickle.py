"""``--merge-into`` a base whose weights are a pickle: refused by name, never unpickled (issue 22, item 9)."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from robustft.cli import main
from robustft.lora import merge_into_base, read_adapter


@pytest.mark.parametrize("payload", ["state_dict", "garbage"])
def test_a_pickle_only_base_is_refused_by_name_and_never_unpickled(lora_zoo, tmp_path, capsys, monkeypatch,
                                                                   payload):
    base, adapters = lora_zoo
    pickled = tmp_path / "base"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled / "config.json")
    if payload == "state_dict":  # a real checkpoint as torch.save writes it
        torch.save(LlamaForCausalLM.from_pretrained(base).state_dict(), pickled / "pytorch_model.bin")
    else:  # what made the raw UnpicklingError traceback
        (pickled / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append(a) or pytest.fail("pickle.load called"))
    out = tmp_path / "merged"
    capsys.readouterr()
    argv = ["lora", "negate", str(adapters["a"]), "--merge-into", str(pickled), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft lora: error: ") and "pytorch_model.bin" in err, err
    assert "convert it to safetensors" in err
    assert "never loads" in err and not out.exists() and loads == []
    with pytest.raises(OSError, match="pytorch_model.bin: pickle"):
        merge_into_base(read_adapter(adapters["a"]), pickled, out)
