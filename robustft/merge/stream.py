"""Streamed safetensors I/O: read checkpoints (single file or sharded with an index) tensor by tensor,
and write an output folder whose files are produced one tensor at a time.

Reading goes through ``safetensors.safe_open`` (memory-mapped, a tensor is materialised only
when asked for). Writing lays out the safetensors header first (all shapes and dtypes are known
from the input headers) and then appends each tensor's bytes, so peak memory is a few tensors,
never a shard or a model. Outputs are written into a temporary folder beside the target and
renamed into place; an existing output is only replaced when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["CheckpointReader", "atomic_output_dir", "copy_side_files", "write_safetensors_streamed"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


class CheckpointReader:
    """Name -> tensor access over a checkpoint folder (``model.safetensors`` or a sharded index) or file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        if self.path.is_file():
            self.folder, files = self.path.parent, {None: self.path}
            self.index: dict[str, str] | None = None
        else:
            self.folder = self.path
            index_path = self.path / INDEX_NAME
            if index_path.is_file():
                self.index = json.loads(index_path.read_text())["weight_map"]
                files = {f: self.path / f for f in sorted(set(self.index.values()))}
            elif (self.path / SINGLE_NAME).is_file():
                self.index, files = None, {None: self.path / SINGLE_NAME}
            elif (self.path / "adapter_config.json").is_file():
                raise ValueError(
                    f"checkpoint {self.path} is a PEFT adapter: interpolating LoRA factors A and B is not "
                    "interpolating the model (WiSE-FT of LoRA scales the delta B·A). Merge each adapter "
                    "into its base model (merge_and_unload + save_pretrained) and interpolate those folders"
                )
            else:
                raise FileNotFoundError(
                    f"checkpoint {self.path}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints "
                    "are read; convert .bin checkpoints with save_pretrained(safe_serialization=True))"
                )
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(f"checkpoint {self.path}: shard {f} listed in the index is missing")
        self._files = files
        self._handles = {k: safe_open(str(f), framework="pt") for k, f in files.items()}
        self._where: dict[str, str | None] = {}
        self._layout: dict[str | None, tuple[int, dict]] = {}
        self.metadata: dict[str, str] = {}
        for k, h in self._handles.items():
            self.metadata.update(h.metadata() or {})
            for name in h.keys():
                self._where[name] = k
        if self.index is not None:
            for name, shard in self.index.items():
                if self._where.get(name) != shard:
                    raise ValueError(
                        f"checkpoint {self.path}: tensor {name!r} is not in its indexed shard {shard}"
                    )

    def keys(self) -> list[str]:
        return list(self._where)

    def shard_of(self, name: str) -> str | None:
        """File name of the shard holding ``name`` (None for a single-file checkpoint)."""
        return self._where[name]

    def shards(self) -> list[str | None]:
        return list(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a positioned read (no memory map), so only this tensor becomes resident."""
        shard = self._where[name]
        path = self._files[shard]
        if shard not in self._layout:
            self._layout[shard] = _read_header(path)
        base, entries = self._layout[shard]
        code, shape, (begin, end) = entries[name]
        buf = bytearray(end - begin)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + begin)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path}: tensor {name!r} is truncated")
                got += n
        if not buf:
            return torch.empty(shape, dtype=_TORCH[code])
        return torch.frombuffer(buf, dtype=_TORCH[code]).reshape(shape)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self._files.values())


def check_same_layout(
    a: CheckpointReader, b: CheckpointReader, names: tuple[str, str] = ("start", "end")
) -> None:
    """Same tensor names, shapes and dtypes in both checkpoints; else a ValueError naming the tensor."""
    ka, kb = set(a.keys()), set(b.keys())
    if ka != kb:
        only_a, only_b = sorted(ka - kb), sorted(kb - ka)
        first = (only_a or only_b)[0]
        raise ValueError(
            f"tensor {first!r}: the checkpoints have different tensors "
            f"(only in {names[0]}: {only_a[:5]}, only in {names[1]}: {only_b[:5]})"
        )
    for name in a.keys():
        if a.shape(name) != b.shape(name):
            raise ValueError(
                f"tensor {name!r}: shape {a.shape(name)} in {names[0]} but {b.shape(name)} in {names[1]}"
            )
        if a.dtype(name) not in _TORCH:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype(name)} not supported by the streamed reader")
        if a.dtype(name) != b.dtype(name):
            raise ValueError(
                f"tensor {name!r}: dtype {a.dtype(name)} in {names[0]} but {b.dtype(name)} in {names[1]}"
            )


def _dtype_code(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors by the streamed writer")
    return _DTYPES[dtype]


_TORCH = {v: k for k, v in _DTYPES.items()}


def _read_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]]:
    """(offset of the data section, name -> (dtype code, shape, (begin, end))) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}


_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def write_safetensors_streamed(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file holding ``specs`` (name -> (dtype code, shape)), asking ``produce(name)``
    for one tensor at a time: the header is written first, then each tensor's bytes.

    A produced tensor whose dtype or shape differs from its spec is a ValueError naming it.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, (code, shape) in specs.items():
        if code not in _ITEMSIZE:
            raise ValueError(f"tensor {name!r}: dtype {code} not supported by the streamed writer")
        n = _ITEMSIZE[code]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (code, shape) in specs.items():
            t = produce(name)
            if _dtype_code(t.dtype) != code or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"tensor {name!r}: produced {t.dtype} {tuple(t.shape)}, expected {code} {tuple(shape)}"
                )
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other small top-level files (not weights, not the index) from src."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != INDEX_NAME:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed.

    An existing ``out`` is a FileExistsError (raised before anything is written) unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output {out} already exists (pass --overwrite / overwrite=True to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
