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
from pathlib import Path

import torch

from robustft.merge.stream import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    atomic_output_dir,
    check_same_layout,
    copy_side_files,
    write_safetensors_streamed,
)
from robustft.ops.interpolate import check_alpha, check_method, lerp, slerp

__all__ = ["interpolate_checkpoints"]


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
    out = Path(out)
    for src in (a.path, b.path):
        if out.resolve() == src.resolve():
            raise ValueError(f"out: {out} is one of the inputs; write to a new folder")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:

        def produce(name: str) -> torch.Tensor:
            s, e = a.get(name), b.get(name)
            if not e.is_floating_point():
                if not torch.equal(s, e):
                    raise ValueError(f"tensor {name!r}: non-floating tensors differ between start and end")
                return e
            return fn(s, e, alpha).to(e.dtype)

        shards = b.shards()
        for shard in shards:
            names = [n for n in b.keys() if b.shard_of(n) == shard]
            specs = {n: (b.dtype(n), b.shape(n)) for n in names}
            target = tmp / (shard if shard is not None else SINGLE_NAME)
            write_safetensors_streamed(target, specs, produce, metadata={"format": "pt", **b.metadata})
        if b.index is not None:
            index = json.loads((b.folder / INDEX_NAME).read_text())
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if b.path.is_dir():
            copy_side_files(b.folder, tmp)
        info = {
            "start": str(a.path),
            "end": str(b.path),
            "alpha": alpha,
            "method": method,
            "tensors": len(b.keys()),
            "shards": len(shards),
            "bytes": b.nbytes(),
        }
        (tmp / "robustft_interpolate.json").write_text(json.dumps(info, indent=2))
    return info
