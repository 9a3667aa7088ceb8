"""Callback state beside a Trainer checkpoint: tensors as safetensors plus a small JSON, written atomically.

Layout: ``<checkpoint>/robustft/<name>.safetensors`` and ``<name>.json``; with sharded (FSDP2)
tensors each rank writes ``<name>.rank<R>.safetensors``. Reading a state that should be there
and is not raises ``FileNotFoundError`` naming the path, so a resume never silently restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "STATE_DIR",
    "atomic_output_dir",
    "atomic_write_text",
    "check_output_dir",
    "load_state",
    "save_state",
    "state_paths",
]

STATE_DIR = "robustft"


def state_paths(checkpoint_dir: str | os.PathLike, name: str, rank: int | None = None) -> tuple[Path, Path]:
    """(tensor file, json file) of state ``name`` in ``checkpoint_dir``."""
    base = Path(checkpoint_dir) / STATE_DIR
    suffix = f".rank{rank}" if rank is not None else ""
    return base / f"{name}{suffix}.safetensors", base / f"{name}.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to ``path.tmp`` then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(
    checkpoint_dir: str | os.PathLike,
    name: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    rank: int | None = None,
    write_meta: bool = True,
) -> None:
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) for state ``name``."""
    tensor_path, meta_path = state_paths(checkpoint_dir, name, rank)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, tensor_path)
    if write_meta:
        atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))


def load_state(
    checkpoint_dir: str | os.PathLike, name: str, rank: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read state ``name``; a missing file is a ``FileNotFoundError`` that names it."""
    tensor_path, meta_path = state_paths(checkpoint_dir, name, rank)
    for path in (tensor_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"robustft state {name!r} expected at {path} but not found: the checkpoint was not written "
                "with this callback (or the file was removed)"
            )
    return load_file(str(tensor_path)), json.loads(meta_path.read_text())


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; refuse a file where a folder should be."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` by rename, on error it is removed.

    An existing ``out`` is only replaced when ``overwrite`` is true, and only after the new folder is
    complete, so a failed write never destroys the previous output.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
