"""Safe outputs: the one atomic-write helper (files and folders); callback state beside a checkpoint.

Every output of robustft is written under a hidden temporary sibling name, flushed to disk (``fsync``) and
renamed into place, so a crash never leaves a half-written output under the real name:

- ``atomic_output_file(path)`` / ``atomic_write_text(path, text)`` for one file;
- ``atomic_output_dir(out, overwrite, inputs)`` for a folder (a merged model, an adapter). It refuses an
  output that is, contains or lies inside one of the ``inputs`` (resolved paths, symlinks followed), so
  ``--overwrite`` can never delete what is being read; applies the umask to the folder; and on start
  cleans what a killed run of the same output left behind.

Temporary names carry the writer's host and process id (``.NAME.tmp-<host>-<pid>-<token>``; the old output
during an overwrite: ``.NAME.old-...``), so a later run removes only leftovers whose process is gone and puts
back an old output that a crash between the two renames of an overwrite left aside.

Callback state: ``<checkpoint>/robustft/<name>.safetensors`` and ``<name>.json``; with sharded (FSDP2)
tensors each rank writes ``<name>.rank<R>.safetensors``. Reading a state that should be there
and is not raises ``FileNotFoundError`` naming the path, so a resume never silently restarts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "STATE_DIR",
    "atomic_output_dir",
    "atomic_output_file",
    "atomic_write_text",
    "apply_umask",
    "check_output_dir",
    "current_umask",
    "load_state",
    "pyplot",
    "save_figure",
    "save_report",
    "save_state",
    "state_paths",
]

STATE_DIR = "robustft"

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # leftovers of other hosts are never removed


def _temp_name(target: Path, kind: str, suffix: str = "") -> Path:
    """A fresh hidden sibling of ``target`` naming this host and process: ``.NAME.KIND-HOST-PID-TOKEN``."""
    return target.with_name(f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts; off POSIX: always assumed)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def _leftovers(target: Path, kind: str, suffix: str = "") -> tuple[list[Path], list[Path]]:
    """(stale, unknown) temporaries ``kind`` of ``target``: stale ones belong to a dead process of this host;
    unknown ones to a live process, another host, or an older naming scheme (never removed)."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.{kind}-(?:([0-9a-f]{{8}})-(\d+)-[0-9a-f]+{re.escape(suffix)})?.*"
    )
    stale, unknown = [], []
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return stale, unknown
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        ours = m.group(1) == _HOST
        if ours and int(m.group(2)) == os.getpid():
            continue  # this process is writing it
        (stale if ours and not _pid_alive(int(m.group(2))) else unknown).append(entry)
    return stale, unknown


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder entry list, to disk (folders only where the OS allows opening them)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a folder
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without setting it where the OS shows it (Linux: ``/proc/self/status``):
    setting it to read it would briefly give files other threads create the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the mode ``open``/``mkdir`` give a new file or
    folder: 0o666 / 0o777 minus the umask. Writers such as safetensors' ``save_file`` create 0o600 files
    (through a private temporary file); every output goes through here so it is readable as promised
    (docs/outputs.md). Symlinks are left alone (chmod would change their target, perhaps an input)."""
    mask = current_umask()
    root = Path(path)
    entries = [root]
    if root.is_dir():
        entries += [Path(folder, n) for folder, dirs, files in os.walk(root) for n in dirs + files]
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
            mode = (0o777 if stat.S_ISDIR(info.st_mode) else 0o666) & ~mask
            if stat.S_IMODE(info.st_mode) != mode:
                os.chmod(entry, mode)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (the data first, then the entries that name it)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                _fsync(path)
        _fsync(Path(folder))


@contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix) to write; on success it is fsynced and renamed to
    ``path``.

    On an error the temporary file is removed and ``path`` is untouched. Temporaries left by killed
    writers of the same file are removed first. The file gets the usual umask-derived mode
    (:func:`apply_umask`), whatever created it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(path, "tmp", path.suffix)[0]:
        _remove(stale)
    tmp = _temp_name(path, "tmp", path.suffix)
    try:
        yield tmp
        apply_umask(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_output_file``)."""
    with atomic_output_file(path) as tmp:
        Path(tmp).write_text(text)


def pyplot():
    """matplotlib's ``pyplot`` on the Agg (file-only) backend; None without matplotlib (no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``path`` atomically (:func:`atomic_output_file`) and close it."""
    path = Path(path)
    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def save_report(
    output_dir: str | os.PathLike,
    stem: str,
    json_text: str,
    csv_text: str,
    plot: Callable[[Path], Path | None] | None = None,
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and (``plot`` given; it returns None without matplotlib)
    ``<stem>.png`` into ``output_dir``, each atomically; returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv"]
    atomic_write_text(paths[0], json_text)
    atomic_write_text(paths[1], csv_text)
    if plot is not None:
        png = plot(out / f"{stem}.png")
        if png is not None:
            paths.append(png)
    return paths


def state_paths(checkpoint_dir: str | os.PathLike, name: str, rank: int | None = None) -> tuple[Path, Path]:
    """(tensor file, json file) of state ``name`` in ``checkpoint_dir``."""
    base = Path(checkpoint_dir) / STATE_DIR
    suffix = f".rank{rank}" if rank is not None else ""
    return base / f"{name}{suffix}.safetensors", base / f"{name}.json"


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
    with atomic_output_file(tensor_path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
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


def _same_path(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_an_input(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside an input (resolved paths, symlinks followed)."""
    o = out.resolve()
    for given in inputs:
        if given is None:
            continue
        i = Path(given).resolve()
        if _same_path(o, i):
            relation = "is"
        elif any(_same_path(o, parent) for parent in i.parents):
            relation = "contains"
        elif any(_same_path(i, parent) for parent in o.parents):
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"output {out} {relation} the input {given}; writing there could replace or delete the input: "
            "choose an output folder outside every input"
        )


def _recover(out: Path) -> None:
    """Clean what killed writers of ``out`` left: remove stale temporaries; put back an old output that a
    crash between the two renames of an overwrite left aside (when ``out`` is missing), else remove it."""
    stale_tmp, unknown_tmp = _leftovers(out, "tmp")
    stale_old, unknown_old = _leftovers(out, "old")
    for path in stale_tmp:
        _remove(path)
    stale_old.sort(key=lambda p: p.stat().st_mtime)
    if stale_old and not os.path.lexists(out) and not unknown_old:
        os.replace(stale_old.pop(), out)
        warnings.warn(f"{out} was restored from the copy a killed overwrite left aside", stacklevel=3)
    for path in stale_old:
        _remove(path)
    unknown = unknown_tmp + unknown_old
    if unknown:
        warnings.warn(
            f"{len(unknown)} temporary folder(s) of {out} belong to a running writer, another host or an "
            f"older robustft: {', '.join(p.name for p in unknown[:3])}; delete them by hand if no run is "
            f"writing {out}",
            stacklevel=3,
        )


def check_output_dir(
    out: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Validate an output folder before anything is read or written; returns it as a ``Path``.

    Refuses an output that is, contains or lies inside one of ``inputs`` (``ValueError``), an existing output
    unless ``overwrite``, and a file where a folder should be (``FileExistsError``). Leftovers of killed runs
    of the same output are cleaned first (see the module docstring).
    """
    out = Path(out)
    _check_not_an_input(out, inputs)
    _recover(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is fsynced and replaces ``out`` by rename; on error
    it is removed.

    ``out`` is checked first (``check_output_dir``: not an input, exists only with ``overwrite``). An
    existing ``out`` is replaced only after the new folder is complete, so a failed write never destroys
    the previous output. The folder and every file in it get the mode the umask gives a new folder or file
    (:func:`apply_umask`), whatever created them.
    """
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()  # mode 0o777 minus the umask (mkdtemp would force 0o700)
    try:
        yield tmp
        apply_umask(tmp)
        _fsync_tree(tmp)
        if out.exists():
            old = _temp_name(out, "old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _fsync(out.parent)
            _remove(old)
        else:
            os.replace(tmp, out)
            _fsync(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: safetensors metadata ``kind`` of a Gram file (written by ``core.statistics.save_gram``, read by
#: ``merge.io.GramFile``): its JSON maps weight name -> row count / input axis sit beside it
GRAM_KIND = "robustft-gram"
