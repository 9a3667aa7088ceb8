"""The streamed safetensors layer against the safetensors library itself (reader and writer)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files, layout_difference


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "c.f64": torch.randn(6, generator=g, dtype=torch.float64),
        "d.int": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.empty(0, 3),
        "g.f16": torch.randn(2, 2, generator=g).half(),
    }


def _sharded(path, tensors, split):
    path.mkdir()
    names = list(tensors)
    files = {"model-1.safetensors": names[:split], "model-2.safetensors": names[split:]}
    for f, ns in files.items():
        save_file({n: tensors[n] for n in ns}, str(path / f), metadata={"format": "pt", "note": "x"})
    weight_map = {n: f for f, ns in files.items() for n in ns}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_reader_matches_safetensors_on_a_sharded_folder(tmp_path):
    ts = _tensors()
    _sharded(tmp_path / "m", ts, 3)
    r = CheckpointReader(tmp_path / "m")
    assert sorted(r.names) == sorted(ts) and r.metadata["note"] == "x"
    for name, t in ts.items():
        got = r.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        got.add_(1) if got.is_floating_point() else None  # a fresh tensor the caller owns
        assert torch.equal(r.get(name), t), name


def test_writer_mirrors_a_layout_and_safetensors_reads_it(tmp_path):
    ts = _tensors()
    weight_map = _sharded(tmp_path / "m", ts, 4)
    src = CheckpointReader(tmp_path / "m")
    plan = [(n, i.shape, i.dtype) for n, i in src.infos.items()]
    out = tmp_path / "o"
    out.mkdir()
    shards = {n: i.file.name for n, i in src.infos.items()}
    with ShardedWriter(out, plan, metadata={"k": "v"}, shards=shards) as w:
        for n in src.names:
            w.write(n, src.get(n))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    got = {}
    for f in set(weight_map.values()):
        got.update(load_file(str(out / f)))
    assert all(torch.equal(got[n], t) for n, t in ts.items())
    # greedy cut at a byte size (counted here by hand from the byte sizes) vs one file
    cuts, used = 0, None
    for t in (ts[n] for n in src.names):
        nbytes = t.numel() * t.element_size()
        if used is None or (used + nbytes > 64 and used > 0):
            cuts, used = cuts + 1, 0
        used += nbytes
    assert cuts > 2
    for size, n_files in ((64, cuts), (None, 1)):
        o = tmp_path / f"o{size}"
        o.mkdir()
        with ShardedWriter(o, plan, max_shard_size=size) as w:
            for n in src.names:
                w.write(n, src.get(n))
        assert len(w.files) == n_files and len(list(o.glob("*.safetensors"))) == n_files
        back = CheckpointReader(o)
        assert all(torch.equal(back.get(n), t) for n, t in ts.items())


def test_writer_refuses_wrong_tensors_and_incomplete_plans(tmp_path):
    plan = [("x", (2,), torch.float32), ("y", (3,), torch.float32)]
    with pytest.raises(ValueError, match="tensor 'x'"):
        ShardedWriter(tmp_path, plan).write("x", torch.zeros(3))
    with pytest.raises(ValueError, match="1 of 2 planned"):
        with ShardedWriter(tmp_path, plan) as w:
            w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="not consecutive"):
        ShardedWriter(tmp_path, [*plan, ("z", (1,), torch.float32)], shards={"x": "1", "y": "2", "z": "1"})


def test_layout_difference_and_bad_folders(tmp_path):
    ts = _tensors()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file(ts, str(tmp_path / "a" / "model.safetensors"))
    save_file({**ts, "a.weight": ts["a.weight"].double()}, str(tmp_path / "b" / "model.safetensors"))
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    assert layout_difference(a, b, exact_dtype=False) is None
    diff = layout_difference(a, b)
    assert (diff.kind, diff.name) == ("dtype", "a.weight")
    assert diff.describe("A", "B") == "tensor 'a.weight' is torch.float64 in B but torch.float32 in A"
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    save_file(ts, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="PEFT adapter"):
        CheckpointReader(tmp_path / "ad")
    raw = (tmp_path / "a" / "model.safetensors").read_bytes()
    (tmp_path / "a" / "model.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="truncated"):
        CheckpointReader(tmp_path / "a")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        CheckpointReader(tmp_path / "bin")


def test_copy_side_files_sets_dtype_and_skips_other_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float32", "hidden_size": 8}))
    (src / "modeling_x.py").write_text("# remote code\n")
    (src / "tokenizer.json").write_text("{}")
    (src / "trainer_state.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_side_files(src, None, out, torch.bfloat16)
    assert sorted(copied) == ["config.json", "modeling_x.py"]
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16" and config["hidden_size"] == 8
    assert copy_side_files(None, src, out) == ["tokenizer.json"]


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("[1, 2]", "not a safetensors index"),
        ('{"metadata": {}}', "not a safetensors index"),
        ('{"weight_map": [["a.weight", "model-1.safetensors"]]}', "weight_map must map tensor names"),
        ("{bad json", "not a safetensors index"),
    ],
)
def test_malformed_index_is_a_value_error_naming_it(tmp_path, index, message):
    _sharded(tmp_path / "m", _tensors(), 3)
    (tmp_path / "m" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=message) as err:
        CheckpointReader(tmp_path / "m")
    assert "model.safetensors.index.json" in str(err.value)


def test_reader_names_file_and_tensor_of_a_malformed_entry(tmp_path):
    raw = json.dumps(
        {
            "ok": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "bad": {"dtype": "F32", "shape": [2, -1], "data_offsets": [4, 4]},
        }
    ).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'bad': shape must be a list of non-negative"
    ):
        CheckpointReader(path)
