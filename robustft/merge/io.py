"""Streamed checkpoint I/O: lazy reads of (sharded) safetensors, a streaming sharded writer, atomic outputs.

Reading: ``CheckpointReader`` learns every tensor's name, shape and dtype from the safetensors *headers*
only (no tensor data), so shapes can be checked across models before anything is loaded; ``get(name)``
then reads that one tensor through ``safe_open``.

Writing: because all output names, shapes and dtypes are known before the first tensor is merged,
``ShardedWriter`` fixes the shard layout and each file's header up front and appends each tensor's bytes
as soon as it is computed. No shard is ever held in memory, so the peak stays near
(number of inputs x largest tensor), whatever ``max_shard_size`` is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "copy_side_files",
    "parse_size",
    "read_safetensors_header",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

# files copied beside the merged weights so that from_pretrained (and the tokenizer) load the folder
SIDE_FILES = (
    "config.json",
    "generation_config.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _element_size(self.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of a safetensors file (name -> {dtype, shape, data_offsets}), without tensor data."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a safetensors file (bad header: {err})") from err
    header.pop("__metadata__", None)
    return header


class CheckpointReader:
    """Lazy name -> tensor access to a Hugging Face folder of safetensors (sharded or not) or to one file.

    Construction reads headers only. ``get(name)`` reads one tensor (a fresh copy the caller owns).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = {}
        for file in self._files():
            for name, entry in read_safetensors_header(file).items():
                dtype = _DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                if name in self.infos:
                    raise ValueError(f"{self.path}: tensor {name!r} appears in two files")
                self.infos[name] = TensorInfo(name, tuple(entry["shape"]), dtype, file)

    def _files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix != ".safetensors":
                raise ValueError(f"{p}: expected a .safetensors file or a model folder")
            return [p]
        if not p.is_dir():
            raise FileNotFoundError(f"model path {p} does not exist")
        index = p / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = []
            for name in dict.fromkeys(weight_map.values()):
                f = p / name
                if not f.is_file():
                    raise FileNotFoundError(f"{index} lists shard {name}, which is missing")
                files.append(f)
            return files
        if (p / SAFE_SINGLE).is_file():
            return [p / SAFE_SINGLE]
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
        other = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(other)}: re-save with save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise FileNotFoundError(f"no safetensors weights in {p}{hint}")

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        # a fresh safe_open per tensor: a handle kept open keeps its memory-mapped pages resident, so the
        # RSS would grow to the size of the checkpoint; opening is cheap (the header is small)
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def close(self) -> None:
        """Nothing stays open between reads; kept so readers work as context managers."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(size: int | str) -> int:
    """``5GB``/``500MiB``/int bytes -> bytes (units as in ``save_pretrained(max_shard_size=...)``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size: {size!r} is not a size like '5GB', '500MiB' or a byte count")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


class ShardedWriter:
    """Writes tensors, in a layout fixed up front, straight to safetensors shards plus an index.

    ``plan`` lists (name, shape, dtype) in writing order. Shards are cut greedily at ``max_shard_size``
    bytes (a tensor larger than that gets a shard of its own); one shard is named ``model.safetensors``,
    several ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as
    ``save_pretrained`` does. ``write`` must be called in plan order.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        limit = parse_size(max_shard_size)
        self._plan = [(n, tuple(s), d) for n, s, d in plan]
        groups: list[list[int]] = []
        size = 0
        for i, (_, shape, dtype) in enumerate(self._plan):
            nbytes = _nbytes(shape, dtype)
            if not groups or (size + nbytes > limit and size > 0):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        n = len(groups)
        self.files = [
            SAFE_SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(max(n, 1))
        ]
        self._groups = groups
        self._metadata = {"format": "pt", **(metadata or {})}
        self._next = 0  # index in plan of the next tensor to write
        self._shard = -1
        self._fh = None
        self._shard_of = {i: k for k, g in enumerate(groups) for i in g}
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in self._plan)

    def _open_shard(self, k: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": self._metadata}
        offset = 0
        for i in self._groups[k]:
            name, shape, dtype = self._plan[i]
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._fh = open(self.out_dir / self.files[k], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise ValueError(
                f"ShardedWriter: tensor {name!r} is beyond the planned {len(self._plan)} tensors"
            )
        exp_name, shape, dtype = self._plan[self._next]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"ShardedWriter: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {exp_name!r} {shape} {dtype}"
            )
        k = self._shard_of[self._next]
        if k != self._shard:
            self._open_shard(k)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._fh.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Finish: check every planned tensor was written, write the index when sharded."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next != len(self._plan):
            raise ValueError(f"ShardedWriter: {self._next} of {len(self._plan)} planned tensors were written")
        if not self._plan:
            return
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {
                    self._plan[i][0]: self.files[k] for k, g in enumerate(self._groups) for i in g
                },
            }
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _element_size(dtype)


def copy_side_files(
    config_source: str | os.PathLike | None,
    tokenizer_source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Copy config (+ generation config) and tokenizer files next to merged weights; returns copied names.

    When ``dtype`` is given the config's ``dtype``/``torch_dtype`` entry is set to it.
    """
    out_dir = Path(out_dir)
    copied = []
    if config_source is not None and Path(config_source).is_dir():
        for name in SIDE_FILES:
            src = Path(config_source) / name
            if src.is_file():
                if name == "config.json" and dtype is not None:
                    config = json.loads(src.read_text())
                    dtype_name = str(dtype).removeprefix("torch.")
                    config["dtype"] = dtype_name
                    if "torch_dtype" in config:
                        config["torch_dtype"] = dtype_name
                    (out_dir / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                else:
                    shutil.copyfile(src, out_dir / name)
                copied.append(name)
    if tokenizer_source is not None and Path(tokenizer_source).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_source) / name
            if src.is_file():
                shutil.copyfile(src, out_dir / name)
                copied.append(name)
    return copied


