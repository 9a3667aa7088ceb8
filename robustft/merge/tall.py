"""TALL-mask compression of T fine-tuned checkpoints: one multi-task vector plus one bit-packed mask per task.

Wang et al., 2024, "Localizing Task Information for Improved Model Merging and Compression" (ICML), Sec. 4.1:
the T task vectors τ_t = θ_t − θ_0 are replaced by τ_MTL = Σ_t τ_t and binary masks
m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}; task t is recovered as θ_0 + m_t ∘ τ_MTL. Storage: the base, one
vector and T bits per weight instead of T models (the maths: :func:`robustft.ops.merge.tall_compress`).

The compressed folder holds ``tall.safetensors`` (``mtl.<tensor>`` in the models' dtype, ``mask.<t>.<tensor>``
as uint8 bytes, 8 entries per byte, :func:`robustft.ops.merge.pack_mask`) and ``tall.json`` (tasks, λ_t,
the base it was made from, each tensor's shape and dtype, each mask's density). Tensors that are not floating
point must be equal in every model and the base; they are taken from the base on extraction. Reading and
writing are streamed tensor by tensor (:class:`robustft.merge.io.CheckpointReader`, ``ShardedWriter``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robustft.checks import check_number
from robustft.core.checkpoint import atomic_output_dir, check_output_dir
from robustft.merge.interpolate import check_same_layout
from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files
from robustft.ops.merge import pack_mask, tall_compress, tall_reconstruct, unpack_mask

__all__ = [
    "TALL_FILE", "TALL_INFO", "TallResult", "tall_compress_checkpoints", "tall_extract", "tall_tensors",
]

TALL_FILE = "tall.safetensors"
TALL_INFO = "tall.json"
FORMAT = "robustft-tall-1"


@dataclass
class TallResult:
    """What :func:`tall_compress_checkpoints` wrote: the folder, its bytes, the inputs' bytes, densities."""

    out_dir: Path
    tasks: list[str]
    tensors: int
    nbytes: int  # the compressed folder's tensors (τ_MTL and the packed masks)
    inputs_nbytes: int  # the T fine-tuned checkpoints' tensors
    density: dict[str, float] = field(default_factory=dict)  # task -> fraction of its mask that is 1
    seconds: float = 0.0


def _lambdas(lambda_: float | Sequence[float], n: int) -> list[float]:
    """λ_t for each of the n tasks (one number for all, or one each), each a finite number ≥ 0."""
    values = [lambda_] * n if not isinstance(lambda_, (list, tuple)) else list(lambda_)
    if len(values) != n:
        raise ValueError(f"lambda_: {len(values)} values for {n} models")
    return [check_number("lambda_", v, low=0.0) for v in values]


def _task_names(models: Sequence[str | os.PathLike], tasks: Sequence[str] | None) -> list[str]:
    names = [Path(m).name for m in models] if tasks is None else [str(t) for t in tasks]
    if len(names) != len(models):
        raise ValueError(f"tasks: {len(names)} names for {len(models)} models")
    for name in names:
        if not name or "." in name or "/" in name:
            raise ValueError(f"tasks: {name!r} is not a usable task name (non-empty, no '.' or '/'); "
                             "name the tasks (tasks=..., --tasks)")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: names must differ, got {names} (name the tasks: tasks=..., --tasks)")
    return names


def tall_compress_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    lambda_: float | Sequence[float] = 0.6,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
) -> TallResult:
    """Write the TALL compression of ``models`` (fine-tuned from ``base``) to the folder ``out``.

    ``lambda_``: λ_t of the masks (the paper picks it per task from [0.2, 0.6] on validation data; default
    0.6 as FusionBench's); ``tasks``: the names of the models in the file (default their folder names).
    Layouts, names and non-floating tensors are checked before ``out`` is created.
    """
    start = time.perf_counter()
    if len(models) < 1:
        raise ValueError("models: need at least one fine-tuned checkpoint")
    lambdas = _lambdas(lambda_, len(models))
    names = _task_names(models, tasks)
    check_output_dir(out, overwrite, [base, *models])
    ref = CheckpointReader(base)
    readers = [CheckpointReader(m) for m in models]
    for name, reader in zip(names, readers, strict=True):
        check_same_layout(ref, reader, ("base", f"model {name!r}"))
    floating = [n for n, i in ref.infos.items() if i.dtype.is_floating_point]
    for n, info in ref.infos.items():
        if n not in floating:
            value = ref.get(n)
            for name, reader in zip(names, readers, strict=True):
                if not torch.equal(reader.get(n), value):
                    raise ValueError(f"tensor {n!r} ({info.dtype}) differs between the base and model "
                                     f"{name!r}: "
                                     "only floating tensors can be compressed")
    plan = []
    for n in floating:
        info = ref.infos[n]
        plan.append((f"mtl.{n}", info.shape, info.dtype))
        plan += [(f"mask.{t}.{n}", ((math.prod(info.shape) + 7) // 8,), torch.uint8) for t in names]
    kept = dict.fromkeys(names, 0)
    total = sum(math.prod(ref.infos[n].shape) for n in floating)
    with atomic_output_dir(out, overwrite, [base, *models]) as tmp:
        with ShardedWriter(tmp, plan, metadata={"format": "pt", "robustft": FORMAT}) as writer:
            for n in floating:
                theta0 = ref.get(n)
                deltas = [r.get(n).to(torch.float64) - theta0.to(torch.float64) for r in readers]
                mtl, masks = tall_compress(deltas, lambdas)
                writer.write(f"mtl.{n}", mtl.to(theta0.dtype))
                for t, m in zip(names, masks, strict=True):
                    kept[t] += int(m.sum())
                    writer.write(f"mask.{t}.{n}", pack_mask(m))
        (tmp / "model.safetensors").rename(tmp / TALL_FILE)
        density = {t: kept[t] / max(total, 1) for t in names}
        info = {
            "format": FORMAT,
            "base": str(Path(base).resolve()),
            "tasks": names,
            "lambda": dict(zip(names, lambdas, strict=True)),
            "density": density,
            "tensors": {n: {"shape": list(i.shape), "dtype": str(i.dtype).removeprefix("torch.")}
                        for n, i in ref.infos.items()},
            "compressed": floating,
        }
        (tmp / TALL_INFO).write_text(json.dumps(info, indent=2) + "\n")
        nbytes = (tmp / TALL_FILE).stat().st_size
    return TallResult(Path(out), names, len(floating), nbytes, sum(r.nbytes() for r in readers), density,
                      time.perf_counter() - start)


def _read_info(compressed: str | os.PathLike) -> dict:
    path = Path(compressed) / TALL_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{compressed}: no {TALL_INFO} (not a TALL compression folder)")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format {info.get('format')!r} is not {FORMAT!r}")
    return info


def _check_base(ref: CheckpointReader, info: dict) -> None:
    """The base has the tensors, shapes and dtypes the compression was made from; else a ValueError."""
    recorded = info["tensors"]
    if set(ref.infos) != set(recorded):
        only = sorted(set(ref.infos) ^ set(recorded))
        raise ValueError(f"base {ref.path}: tensor {only[0]!r} differs from the compression's base "
                         f"{info['base']}")
    for n, i in ref.infos.items():
        want = recorded[n]
        if list(i.shape) != want["shape"] or str(i.dtype).removeprefix("torch.") != want["dtype"]:
            raise ValueError(f"base {ref.path}: tensor {n!r} is {list(i.shape)} {i.dtype}, the compression's "
                             f"base had {want['shape']} {want['dtype']}")


def _task(info: dict, task: str | int) -> str:
    tasks = info["tasks"]
    if isinstance(task, int) and not isinstance(task, bool):
        if not 0 <= task < len(tasks):
            raise ValueError(f"task: index {task} out of range for {len(tasks)} tasks {tasks}")
        return tasks[task]
    if task not in tasks:
        raise ValueError(f"task: {task!r} is not one of the compressed tasks {tasks}")
    return task


def tall_tensors(compressed: str | os.PathLike, task: str | int, base: str | os.PathLike | None = None):
    """Yield (name, tensor) of task ``task`` (a name or an index), θ_0 + m_t ∘ τ_MTL for every floating
    tensor and the base's value for the others, in the base's order, one tensor at a time."""
    info = _read_info(compressed)
    name = _task(info, task)
    ref = CheckpointReader(base if base is not None else info["base"])
    _check_base(ref, info)
    packed = CheckpointReader(Path(compressed) / TALL_FILE)
    compressed_names = set(info["compressed"])
    for n, i in ref.infos.items():
        theta0 = ref.get(n)
        if n in compressed_names:
            mask = unpack_mask(packed.get(f"mask.{name}.{n}"), i.shape)
            yield n, tall_reconstruct(theta0, packed.get(f"mtl.{n}"), mask)
        else:
            yield n, theta0


def tall_extract(
    compressed: str | os.PathLike,
    task: str | int,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write task ``task``'s model θ_0 + m_t ∘ τ_MTL to the folder ``out`` (the base's shard layout, config
    and tokenizer); ``base`` defaults to the path recorded at compression (checked: same tensors)."""
    info = _read_info(compressed)
    _task(info, task)
    base = Path(base if base is not None else info["base"])
    check_output_dir(out, overwrite, [compressed, base])
    ref = CheckpointReader(base)
    _check_base(ref, info)
    plan = [(n, i.shape, i.dtype) for n, i in ref.infos.items()]
    shards = {n: i.file.name for n, i in ref.infos.items()}
    with atomic_output_dir(out, overwrite, [compressed, base]) as tmp:
        metadata = {**ref.metadata, "extracted_by": "robustft tall"}
        with ShardedWriter(tmp, plan, None, metadata, shards) as writer:
            for n, tensor in tall_tensors(compressed, task, base):
                writer.write(n, tensor)
        copy_side_files(ref.folder, ref.folder, tmp)
    return Path(out)
