"""The streamed safetensors layer against the safetensors library itself (reader and writer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
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
    # cut at a byte size: the files huggingface_hub plans for save_pretrained on the same tensors, vs one file
    hf = split_torch_state_dict_into_shards({n: ts[n] for n in src.names}, max_shard_size=64)
    assert len(hf.filename_to_tensors) > 2
    for size, n_files in ((64, len(hf.filename_to_tensors)), (None, 1)):
        o = tmp_path / f"o{size}"
        o.mkdir()
        with ShardedWriter(o, plan, max_shard_size=size) as w:
            for n in src.names:
                w.write(n, src.get(n))
        assert len(w.files) == n_files and len(list(o.glob("*.safetensors"))) == n_files
        if size is not None:
            index = json.loads((o / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == hf.tensor_to_filename
        back = CheckpointReader(o)
        assert all(torch.equal(back.get(n), t) for n, t in ts.items())


def test_writer_interleaved_files_are_read_back_by_safetensors(tmp_path):
    """A file's tensors need not be consecutive (huggingface_hub gives an oversized tensor its own file
    in the middle of another's): every file is still exactly what safetensors reads."""
    ts = _tensors()
    names = list(ts)
    shards = {n: ("b.safetensors" if i in (1, 4) else "a.safetensors") for i, n in enumerate(names)}
    with ShardedWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in ts.items()], shards=shards) as w:
        for n in names:
            w.write(n, ts[n])
    for f in ("a.safetensors", "b.safetensors"):
        got = load_file(str(tmp_path / f))
        assert sorted(got) == sorted(n for n in names if shards[n] == f)
        assert all(torch.equal(got[n], ts[n]) for n in got)


def _random_bytes_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    item = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * item,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).reshape(shape)


def test_reader_matches_safe_open_on_every_dtype_safetensors_supports(tmp_path):
    """Every dtype of the installed safetensors (its own table): same names, shapes, dtypes and bytes as
    ``safe_open``, for a file we did not write and for one our writer wrote."""
    import safetensors.torch as st

    dtypes = dict(st._TYPES)
    assert {"BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64"} <= set(dtypes)
    ts = {f"t.{code}": _random_bytes_tensor(dt, (3, 5), i) for i, (code, dt) in enumerate(dtypes.items())}
    ts["t.scalar"] = torch.tensor(2.5, dtype=torch.float64)
    ts["t.empty"] = torch.empty(0, 4, dtype=torch.int16)
    save_file(ts, str(tmp_path / "ref.safetensors"))
    ours = CheckpointReader(tmp_path / "ref.safetensors")
    (tmp_path / "o").mkdir()
    with ShardedWriter(tmp_path / "o", [(n, i.shape, i.dtype) for n, i in ours.infos.items()]) as w:
        for n in ours.names:
            w.write(n, ours.get(n))
    for path in (tmp_path / "ref.safetensors", tmp_path / "o" / "model.safetensors"):
        reader = CheckpointReader(path)
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(reader.names) == sorted(ts)
            for name in f.keys():
                want, got = f.get_tensor(name), reader.get(name)
                assert got.dtype == want.dtype and got.shape == want.shape, name
                as_bytes = [t.reshape(-1).view(torch.uint8) for t in (got, want)]
                assert torch.equal(*as_bytes), name


def test_writer_refuses_wrong_tensors_and_incomplete_plans(tmp_path):
    plan = [("x", (2,), torch.float32), ("y", (3,), torch.float32)]
    with pytest.raises(ValueError, match="tensor 'x'"):
        ShardedWriter(tmp_path, plan).write("x", torch.zeros(3))
    with pytest.raises(ValueError, match="1 of 2 planned"):
        with ShardedWriter(tmp_path, plan) as w:
            w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 'z' has no file"):
        ShardedWriter(tmp_path, [*plan, ("z", (1,), torch.float32)], shards={"x": "1", "y": "2"})


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


def test_parse_size_reads_save_pretrained_units_as_huggingface_hub_does():
    """``max_shard_size`` strings in the units ``save_pretrained`` accepts (huggingface_hub's
    ``parse_size_to_int``: KB, MB, GB, TB, decimal) give the same byte count; binary units and plain byte
    counts are robustft's own additions (huggingface_hub refuses them)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    from robustft.merge.io import parse_size

    for size in ("5GB", "500MB", "2KB", "1TB", "1.5GB", "0.1GB", " 3 MB ", "7gb", "200mb"):
        assert parse_size(size) == parse_size_to_int(size), size
    assert parse_size("1MiB") == 2**20 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    for extra in ("1MiB", "123B"):
        with pytest.raises(ValueError):
            parse_size_to_int(extra)
