"""Streamed safetensors I/O for whole checkpoints: lazy reads of (sharded) folders, a streaming writer.

Reading: ``CheckpointReader`` learns every tensor's name, shape, dtype and byte range from the safetensors
*headers* only (no tensor data), so layouts can be compared across models (``layout_difference``) before
anything is loaded; ``get(name)`` then reads that one tensor with a positioned read (no memory map).

Writing: because all output names, shapes and dtypes are known before the first tensor is merged,
``ShardedWriter`` fixes the shard layout and each file's header up front and appends each tensor's bytes
as soon as it is computed. No shard is ever held in memory, so the peak stays near
(number of inputs x largest tensor), whatever ``max_shard_size`` is. Outputs go through
``robustft.core.checkpoint.atomic_output_dir`` (temporary sibling folder, renamed into place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from robustft.checks import short_repr
from robustft.core.checkpoint import GRAM_KIND

__all__ = [
    "GramFile",
    "CheckpointReader",
    "LayoutDifference",
    "LoadedCheckpoint",
    "ShardedWriter",
    "TensorInfo",
    "copy_side_files",
    "layout_difference",
    "load_checkpoints",
    "model_layout",
    "ModelLayoutView",
    "parse_size",
    "read_safetensors_header",
    "resolve_model",
    "shard_plan",
    "write_chat_template",
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
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

# files copied beside the merged weights so that from_pretrained (and the tokenizer) load the folder
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
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
    """What a safetensors header says about one tensor (``begin``/``end``: absolute offsets in ``file``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _element_size(dtype)


def read_safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, dict], dict[str, str]]:
    """(offset of the data section, name -> {dtype, shape, data_offsets}, ``__metadata__``) of a safetensors
    file, read without touching tensor data."""
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
        except ValueError as err:  # bad JSON or bad UTF-8
            raise ValueError(f"{path}: not a safetensors file (bad header: {err})") from err
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise ValueError(f"{path}: not a safetensors file (the header is a {kind}, not a map of tensors)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map names to strings, got {short_repr(metadata)}")
    for name, entry in header.items():
        _check_entry(path, name, entry)
    return 8 + size, header, metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: Path, name: str, entry: object) -> None:
    """One header entry is {dtype: str, shape: [int >= 0], data_offsets: [begin, end], 0 <= begin <= end}."""
    where = f"{path}: tensor {short_repr(name)}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry must be a map, got {short_repr(entry)}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise ValueError(f"{where}: header entry lacks {', '.join(missing)}")
    if not isinstance(entry["dtype"], str):
        raise ValueError(f"{where}: dtype must be a string, got {short_repr(entry['dtype'])}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {short_repr(shape)}")
    offsets = entry["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {short_repr(offsets)}"
        )


class CheckpointReader:
    """Lazy name -> tensor access to a Hugging Face folder of safetensors (sharded or not) or to one file.

    Construction reads headers only (``infos``: name, shape, dtype, file, byte range of every tensor;
    ``metadata``: the files' ``__metadata__``). ``get(name)`` reads one tensor with a positioned read into a
    fresh tensor the caller owns: no memory map, so only that tensor becomes resident (``safe_open`` kept
    mapped pages resident and measured a higher peak RSS at the same speed).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self.index: dict[str, str] | None = None  # weight_map of a sharded folder
        self.files = self._files()
        for file in self.files:
            data_start, header, metadata = read_safetensors_header(file)
            size = file.stat().st_size
            self.metadata.update(metadata)
            for name, entry in header.items():
                dtype = _DTYPES.get(entry["dtype"])
                if dtype is None:
                    what = short_repr(entry["dtype"])
                    raise ValueError(f"{file}: tensor {short_repr(name)} has unsupported dtype {what}")
                if name in self.infos:
                    raise ValueError(f"{self.path}: tensor {name!r} appears in two files")
                begin, end = entry["data_offsets"]
                info = TensorInfo(
                    name, tuple(entry["shape"]), dtype, file, data_start + begin, data_start + end
                )
                if end - begin != info.nbytes:
                    raise ValueError(f"{file}: tensor {name!r} has {end - begin} bytes for {info.nbytes}")
                if info.end > size:
                    raise ValueError(f"{file}: tensor {name!r} is truncated (the file is {size} bytes)")
                self.infos[name] = info
        for name, shard in (self.index or {}).items():
            if name not in self.infos or self.infos[name].file != self.path / shard:
                raise ValueError(f"{self.path}: tensor {name!r} is not in its indexed shard {shard}")

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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index (no weight_map: {err!r})") from err
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: weight_map must map tensor names to file names")
            for tensor, name in weight_map.items():  # before any file is opened: none outside this folder
                if not name or PurePath(name).is_absolute() or ".." in PurePath(name).parts or "\\" in name:
                    raise ValueError(
                        f"{index}: tensor {short_repr(tensor)} is mapped to {short_repr(name)}, outside {p}: "
                        "an index names shard files inside its own folder"
                    )
            self.index = weight_map
            files = []
            for name in dict.fromkeys(self.index.values()):
                f = p / name
                if not f.is_file():
                    raise FileNotFoundError(f"{index} lists shard {name}, which is missing")
                files.append(f)
            return files
        if (p / SAFE_SINGLE).is_file():
            return [p / SAFE_SINGLE]
        if (p / "adapter_config.json").is_file():
            raise ValueError(
                f"{p} is a PEFT adapter: merging or interpolating LoRA factors A and B is not doing so to "
                "the model (WiSE-FT of LoRA scales the delta B·A). Merge each adapter into its base model "
                "(merge_and_unload + save_pretrained) and use those folders"
            )
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
        other = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(other)}: pickle, which robustft never loads since unpickling can run code; "
            "convert it to safetensors: save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise FileNotFoundError(f"no safetensors weights in {p}{hint}")

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def folder(self) -> Path:
        """The model folder (the parent of a single file)."""
        return self.path if self.path.is_dir() else self.path.parent

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        out = torch.empty(info.shape, dtype=info.dtype)
        if not out.numel():
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.begin)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{info.file}: tensor {name!r} is truncated")
                got += n
        return out

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of tensor ``name`` along axis 0, each a positioned read: a few
        rows of an embedding matrix without reading the matrix."""
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        out = torch.empty((len(rows), *info.shape[1:]), dtype=info.dtype)
        step = _nbytes(info.shape[1:], info.dtype)
        if not out.numel():
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as f:
            for k, row in enumerate(rows):
                if not 0 <= row < info.shape[0]:
                    raise IndexError(f"{self.path}: tensor {name!r} has no row {row}")
                f.seek(info.begin + row * step)
                if f.readinto(view[k * step : (k + 1) * step]) != step:
                    raise ValueError(f"{info.file}: tensor {name!r} is truncated")
        return out

    def close(self) -> None:
        """Nothing stays open between reads; kept so readers work as context managers."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoadedCheckpoint(CheckpointReader):
    """A :class:`CheckpointReader` whose tensors are read from disk once, at construction, and kept in
    memory as stored (memory: the checkpoint's size). ``get`` and ``get_rows`` hand out copies the caller
    owns (the merge methods may modify their inputs in place), so a checkpoint can be merged many times
    without a disk read: ``robustft search`` merges every trial from these."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        read = CheckpointReader.get
        self.tensors: dict[str, torch.Tensor] = {name: read(self, name) for name in self.infos}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name].clone()

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        tensor = self.tensors[name]
        bad = [r for r in rows if not 0 <= r < tensor.shape[0]]
        if bad:
            raise IndexError(f"{self.path}: tensor {name!r} has no row {bad[0]}")
        return tensor[list(rows)].clone()

    def memory_bytes(self) -> int:
        """Bytes held in memory (the stored tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


#: a per-expert MoE tensor name (``...experts.3.w1.weight``): a checkpoint layout transformers 5 fuses
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _natural(name: str) -> tuple:
    """Sort key with numbers compared as numbers (expert 10 after expert 9), as transformers stacks them."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"([0-9]+)", name))


def _convert_layout(transforms: Sequence, futures: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Run transformers' checkpoint conversion (``WeightRenaming`` / ``WeightConverter`` s, in order) on
    ``futures`` (name -> callable giving the tensor): (model-layout name -> tensor or callable, model-layout
    name -> the checkpoint names it is made of). One fresh converter per target layer, as mergekit does."""
    import copy

    from transformers.core_model_loading import WeightRenaming

    available = dict(futures)
    sources = {k: (k,) for k in futures}
    for transform in transforms:
        groups: dict[str, list[tuple[str, str]]] = {}
        for key in sorted(available, key=_natural):
            renamed, pattern = transform.rename_source_key(key)
            if pattern is not None:
                groups.setdefault(renamed, []).append((key, pattern))
        for layer, members in groups.items():
            if isinstance(transform, WeightRenaming):
                (key, _), = members
                available[layer], sources[layer] = available.pop(key), sources.pop(key)
                continue
            converter = copy.deepcopy(transform)
            for key, pattern in members:
                converter.add_tensor(layer, key, pattern, available.pop(key))
            made_of = tuple(k for key, _ in members for k in sources.pop(key))
            for name, tensor in converter.convert(layer).items():
                available[name], sources[name] = tensor, made_of
    return available, sources


class ModelLayoutView:
    """A checkpoint saved in its checkpoint layout (Mixtral's per-expert ``block_sparse_moe.experts.<e>.w1``)
    read in transformers 5's model layout (fused 3-D ``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj``),
    by transformers' own conversion mapping: what ``from_pretrained`` builds and what mergekit 0.1.5 merges
    and writes. Names and shapes come from a conversion of empty (meta) tensors; ``get`` converts the tensors
    one model-layout tensor is made of."""

    def __init__(self, reader: CheckpointReader, transforms: Sequence) -> None:
        self.reader, self.transforms = reader, list(transforms)
        meta = {n: (lambda i=i: torch.empty(i.shape, dtype=i.dtype, device="meta"))
                for n, i in reader.infos.items()}
        converted, self.sources = _convert_layout(self.transforms, meta)
        self.infos = {}
        for name, t in converted.items():
            t = t() if callable(t) else t
            first = reader.infos[self.sources[name][0]]
            self.infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, first.file, first.begin, first.end)
        self.names = sorted(self.infos, key=_natural)

    def get(self, name: str) -> torch.Tensor:
        made_of = self.sources.get(name)
        if made_of is None:
            raise KeyError(f"{self.reader.path}: no tensor {name!r}")
        if made_of == (name,):
            return self.reader.get(name)
        futures = {k: (lambda k=k: self.reader.get(k)) for k in made_of}
        tensor = _convert_layout(self.transforms, futures)[0][name]
        return (tensor() if callable(tensor) else tensor).contiguous()

    def get_rows(self, name: str, rows) -> torch.Tensor:
        if self.sources.get(name) == (name,):
            return self.reader.get_rows(name, rows)
        return self.get(name)[list(rows)]

    def __getattr__(self, attr: str):
        return getattr(self.reader, attr)


def model_layout(reader: CheckpointReader) -> CheckpointReader | ModelLayoutView:
    """``reader`` in transformers 5's model layout where it differs from the saved one (an MoE checkpoint
    with per-expert tensors whose ``model_type`` transformers converts on load), else ``reader`` itself;
    transformers is imported only for such a checkpoint."""
    if not any(_PER_EXPERT.search(n) for n in reader.infos):
        return reader
    config = reader.folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if not isinstance(model_type, str):
        return reader
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    transforms = get_checkpoint_conversion_mapping(model_type)
    return ModelLayoutView(reader, transforms) if transforms else reader


def load_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[Path, LoadedCheckpoint]:
    """Each distinct checkpoint of ``paths`` (folders or .safetensors files) read into memory once: the
    "load a set of checkpoints once, merge them many times" helper (search trials, soups)."""
    return {Path(p): LoadedCheckpoint(p) for p in dict.fromkeys(Path(p) for p in paths)}


@dataclass(frozen=True)
class LayoutDifference:
    """The first way ``other`` differs from ``ref``: ``kind`` is missing/extra (tensor ``name`` only in
    ``ref``/``other``; ``more`` others like it), shape or dtype (``ref_value`` vs ``other_value``)."""

    kind: str
    name: str
    more: int = 0
    ref_value: object = None
    other_value: object = None

    def describe(self, ref_label: str, other_label: str) -> str:
        """The error message, naming the tensor and both checkpoints."""
        name, more = self.name, f" (and {self.more} more)" if self.more else ""
        if self.kind == "missing":
            return f"{other_label} lacks tensor {name!r} present in {ref_label}{more}"
        if self.kind == "extra":
            return f"{other_label} has tensor {name!r} absent from {ref_label}{more}"
        what = "has shape" if self.kind == "shape" else "is"
        return (
            f"tensor {name!r} {what} {self.other_value} in {other_label} but {self.ref_value} in {ref_label}"
        )


def layout_difference(
    ref: CheckpointReader, other: CheckpointReader, exact_dtype: bool = True, free_rows: Collection[str] = ()
) -> LayoutDifference | None:
    """Compare two checkpoints' headers: same names, shapes, and dtypes (or, unless ``exact_dtype``, the
    same floating/non-floating kind). Tensors in ``free_rows`` (embeddings mapped onto an output vocabulary)
    may differ in their first dimension. None when they agree."""
    ref_names, names = set(ref.infos), set(other.infos)
    for kind, diff in (("missing", ref_names - names), ("extra", names - ref_names)):
        if diff:
            return LayoutDifference(kind, sorted(diff)[0], len(diff) - 1)
    for name, a in ref.infos.items():
        b = other.infos[name]
        if a.shape != b.shape and (name not in free_rows or a.shape[1:] != b.shape[1:]):
            return LayoutDifference("shape", name, ref_value=a.shape, other_value=b.shape)
        if a.dtype != b.dtype if exact_dtype else a.dtype.is_floating_point != b.dtype.is_floating_point:
            return LayoutDifference("dtype", name, ref_value=a.dtype, other_value=b.dtype)
    return None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(size: int | str) -> int:
    """``5GB``/``500MiB``/int bytes -> bytes: KB..TB as ``save_pretrained(max_shard_size=...)`` reads them
    (decimal, huggingface_hub's ``parse_size_to_int``), plus binary KiB..TiB and byte counts."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ValueError(
                f"max_shard_size: {short_repr(size)} is not a size like '5GB', '500MiB' or a byte count"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {short_repr(size)}")
    return value


def shard_plan(
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int | str
) -> dict[str, str]:
    """Tensor name -> file name, cut at ``max_shard_size`` bytes by huggingface_hub's own planner (the
    factory behind ``split_torch_state_dict_into_shards``, as ``save_pretrained``), fed byte counts: its
    torch entry point imports ``torch.distributed.tensor`` (seconds) to look for DTensors."""
    from huggingface_hub.constants import SAFETENSORS_WEIGHTS_FILE_PATTERN
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    sizes = {name: _nbytes(shape, dtype) for name, shape, dtype in plan}
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda nbytes: nbytes,
        filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=parse_size(max_shard_size),
    )
    return dict(split.tensor_to_filename)


class ShardedWriter:
    """Writes tensors, in a layout fixed up front, straight to safetensors files (plus an index when sharded).

    ``plan`` lists (name, shape, dtype) in writing order. The files: with ``shards`` (name -> file name, e.g.
    an input's index) that layout; else with ``max_shard_size`` the layout huggingface_hub plans for
    ``save_pretrained`` (:func:`shard_plan`: a tensor larger than the limit gets a file of its own); else one
    file. One file is named ``model.safetensors``. ``write`` must be called in plan order; each file is
    opened (header first) at its first tensor and closed after its last, so a file's tensors need not be
    consecutive in the plan. As a context manager it closes on success and aborts on an error.

    Hand-written rather than ``safetensors.torch.save_file`` on each shard because that needs the whole
    shard in memory: streaming keeps the peak near one tensor (tests/merge/test_memory.py measures it).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_size: int | str | None = None,
        metadata: dict[str, str] | None = None,
        shards: Mapping[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self._plan = [(n, tuple(s), d) for n, s, d in plan]
        for name, _, dtype in self._plan:
            if dtype not in _NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        if shards is None and max_shard_size is not None:
            shards = shard_plan(self._plan, max_shard_size)
        files: dict[str, list[int]] = {}  # file name -> plan indices, in order of first appearance
        for i, (name, _, _) in enumerate(self._plan):
            if shards is None:
                files.setdefault(SAFE_SINGLE, []).append(i)
            elif name not in shards:
                raise ValueError(f"ShardedWriter: tensor {name!r} has no file in the given shard layout")
            else:
                files.setdefault(shards[name], []).append(i)
        if len(files) == 1:
            files = {SAFE_SINGLE: next(iter(files.values()))}
        self.files = list(files) or [SAFE_SINGLE]
        self._groups = list(files.values())
        self._metadata = {"format": "pt", **(metadata or {})}
        self._next = 0  # index in plan of the next tensor to write
        self._open: dict[int, object] = {}  # shard -> open file
        self._shard_of = {i: k for k, g in enumerate(self._groups) for i in g}
        self._last = {g[-1]: k for k, g in enumerate(self._groups)}
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in self._plan)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self, k: int):
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
        fh = self._open[k] = open(self.out_dir / self.files[k], "wb")
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise ValueError(
                f"ShardedWriter: tensor {name!r} is beyond the planned {len(self._plan)} tensors"
            )
        exp_name, shape, dtype = self._plan[self._next]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype} to write, "
                f"planned {exp_name!r} {shape} {dtype}"
            )
        k = self._shard_of[self._next]
        fh = self._open.get(k) or self._open_shard(k)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            fh.write(data.reshape(-1).view(torch.uint8).numpy().data)
        if self._next in self._last:
            self._open.pop(k).close()
        self._next += 1

    def close(self) -> None:
        """Finish: check every planned tensor was written, write the index when sharded."""
        self.abort()
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
        """Close any open file (the folder is discarded by the caller)."""
        while self._open:
            self._open.popitem()[1].close()


def copy_side_files(
    config_source: str | os.PathLike | None,
    tokenizer_source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Copy config (+ generation/processor configs, remote-code ``*.py`` modules) from ``config_source`` and
    tokenizer files from ``tokenizer_source`` next to written weights; returns the copied names.

    When ``dtype`` is given the config's ``dtype``/``torch_dtype`` entry is set to it.
    """
    out_dir = Path(out_dir)
    copied = []
    if config_source is not None and Path(config_source).is_dir():
        code = sorted(f.name for f in Path(config_source).glob("*.py"))  # auto_map modules (remote code)
        for name in (*SIDE_FILES, *code):
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


#: the files a merge reads from a Hub snapshot (mergekit's patterns, plus the tokenizer and chat templates)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.model", "*.py"]


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if flag is None else flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model(ref: str) -> Path:
    """The local folder of a recipe's model: the path itself when it exists, else a Hugging Face Hub id
    (``org/name``, ``org/name@revision``) looked up through huggingface_hub's cache (``snapshot_download``;
    with ``HF_HUB_OFFLINE=1`` the cache only, and an error naming the model and how to get it)."""
    if os.path.exists(ref):
        return Path(ref)
    repo, _, revision = ref.partition("@")
    if os.path.exists(repo):  # mergekit splits at '@' and then ignores the revision of a local folder
        return Path(repo)
    if (
        repo.startswith((".", "/", "~"))
        or os.path.isabs(repo)
        or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo)
    ):
        return Path(ref)  # a local path that does not exist: the reader says so
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _hub_offline()
    cache = os.environ.get("HF_HUB_CACHE")
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=cache,
            allow_patterns=HUB_PATTERNS,
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
        raise FileNotFoundError(
            f"model {ref}: not a local folder and not found {where}; download it first "
            f"(`hf download {repo}{' --revision ' + revision if revision else ''}` with network access, "
            "or unset HF_HUB_OFFLINE), or give a local folder"
        ) from err
    return Path(folder)


def _template_of(folder: Path) -> str | None:
    """A tokenizer folder's chat template (chat_template.jinja, else tokenizer_config.json's default)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def write_chat_template(value: str, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> bool:
    """Write a recipe's ``chat_template`` (mergekit's: a template name, ``auto`` = the inputs' most common
    template, or a Jinja string) as ``chat_template.jinja`` beside the tokenizer written in ``out_dir``
    (the copy in tokenizer_config.json removed, as transformers saves it); False if none was written."""
    from collections import Counter

    from robustft.merge.chat_templates import chat_template_text

    out_dir = Path(out_dir)
    template = chat_template_text(value)
    if template is None:
        found = [t.strip() for t in (_template_of(Path(p)) for p in dict.fromkeys(inputs)) if t]
        if not found:
            return False
        template = Counter(found).most_common(1)[0][0]
    config = out_dir / "tokenizer_config.json"
    if not config.is_file():
        import warnings

        warnings.warn("chat_template is given but no tokenizer is written: it is not saved", stacklevel=2)
        return False
    data = json.loads(config.read_text())
    if data.pop("chat_template", None) is not None:
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.json").unlink(missing_ok=True)
    (out_dir / "chat_template.jinja").write_text(template)
    return True


class GramFile:
    """A file written by :func:`save_gram`, read lazily: headers and counts at once, one Gram per ``mean``."""

    def __init__(self, path: str | os.PathLike, who: str = "gram"):
        self.path = Path(path)
        self.who = who
        if not self.path.is_file():
            raise FileNotFoundError(f"{who}: Gram file {self.path} not found")
        self.reader = CheckpointReader(self.path)
        meta = self.reader.metadata
        if meta.get("kind") != GRAM_KIND:
            raise ValueError(f"{who}: {self.path} is not a Gram file (written by robustft's save_gram)")
        try:
            self.counts = {str(k): int(v) for k, v in json.loads(meta["counts"]).items()}
            self.input_axis = {str(k): int(v) for k, v in json.loads(meta["input_axis"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{who}: {self.path} has unreadable Gram metadata ({err!r})") from err
        for name in self.reader.infos:
            if self.counts.get(name, 0) <= 0 or self.input_axis.get(name) not in (0, 1):
                raise ValueError(
                    f"{who}: Gram {name!r} in {self.path} has no rows counted or no input axis; "
                    "estimate it on data that reaches the layer"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.reader.infos

    def check(self, name: str, weight_shape: tuple[int, ...]) -> None:
        """Raise unless the Gram of ``name`` fits a weight of ``weight_shape`` (2-D, (in, in))."""
        shape = self.reader.infos[name].shape
        if len(weight_shape) != 2:
            raise ValueError(
                f"{self.who}: {self.path} has a Gram for {name!r}, whose weight has shape "
                f"{tuple(weight_shape)} (RegMean needs a 2-D weight)"
            )
        n_in = weight_shape[self.input_axis[name]]
        if shape != (n_in, n_in):
            raise ValueError(
                f"{self.who}: Gram {name!r} in {self.path} has shape {shape}, expected ({n_in}, {n_in}) for "
                f"the weight of shape {tuple(weight_shape)} (input axis {self.input_axis[name]})"
            )

    def mean(self, name: str) -> torch.Tensor:
        """G / count: the Gram of ``name`` averaged over its rows (FusionBench's normalisation), float32."""
        return self.reader.get(name).float().div_(self.counts[name])
