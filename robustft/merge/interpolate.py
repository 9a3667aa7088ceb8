"""Streamed WiSE-FT / SLERP interpolation of two saved checkpoints into a loadable model folder.

θ(α) = (1−α)·θ_start + α·θ_end (or per-tensor SLERP), read tensor by tensor from two
(sharded) safetensors checkpoints and written tensor by tensor, so peak memory is a few
tensors. Every header is checked before anything is written: different tensor names, shapes or
dtypes stop with an error naming the tensor. The output mirrors the end checkpoint's shard
layout (and index), and carries its config and tokenizer files.
"""

from __future__ import annotations

import json
import os

import torch

from robustft.checkpoint import atomic_output_dir
from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files, layout_difference
from robustft.ops.interpolate import check_alpha, check_method, lerp, slerp

__all__ = ["check_same_layout", "interpolate_checkpoints"]


def check_same_layout(
    a: CheckpointReader, b: CheckpointReader, names: tuple[str, str] = ("start", "end")
) -> None:
    """Same tensor names, shapes and dtypes in both checkpoints; else a ValueError naming the tensor."""
    diff = layout_difference(a, b)
    if diff is None:
        return
    if diff.kind == "shape":
        raise ValueError(
            f"tensor {diff.name!r}: shape {diff.ref_value} in {names[0]} but {diff.other_value} in {names[1]}"
        )
    raise ValueError(diff.describe(*names))


def interpolate_checkpoints(
    start: str | os.PathLike,
    end: str | os.PathLike,
    out: str | os.PathLike,
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write θ(α) of two checkpoints to ``out``; returns a summary (tensors, bytes, shards)."""
    alpha = check_alpha(alpha, extrapolate)
    fn = {"linear": lerp, "slerp": slerp}[check_method(method)]
    a, b = CheckpointReader(start), CheckpointReader(end)
    check_same_layout(a, b)
    plan = [(n, info.shape, info.dtype) for n, info in b.infos.items()]
    shards = {n: info.file.name for n, info in b.infos.items()} if b.index is not None else None
    with atomic_output_dir(out, overwrite, [start, end]) as tmp:
        with ShardedWriter(tmp, plan, metadata=b.metadata, shards=shards) as writer:
            for name in b.names:
                s, e = a.get(name), b.get(name)
                if not e.is_floating_point():
                    if not torch.equal(s, e):
                        raise ValueError(f"tensor {name!r}: non-floating tensors differ in start and end")
                    writer.write(name, e)
                else:
                    writer.write(name, fn(s, e, alpha).to(e.dtype))
                del s, e
        if b.path.is_dir():
            copy_side_files(b.folder, b.folder, tmp)
        info = {
            "start": str(a.path),
            "end": str(b.path),
            "alpha": alpha,
            "method": method,
            "tensors": len(b.names),
            "shards": len(writer.files),
            "bytes": b.nbytes(),
        }
        (tmp / "robustft_interpolate.json").write_text(json.dumps(info, indent=2))
    return info
