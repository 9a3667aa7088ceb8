"""Output safety of every command that writes (docs/outputs.md): an output never touches an input, gets the
umask's mode, is fsynced before it is renamed into place, leftovers of killed runs are cleaned (the old
output put back), disk errors and malformed files end in ``robustft CMD: error: ...`` with exit 2, and a
YAML alias bomb is refused promptly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustft.checks import short_repr
from robustft.cli import main
from robustft.core import checkpoint
from robustft.core.checkpoint import atomic_output_dir, atomic_output_file, check_output_dir
from robustft.core.statistics import save_fisher
from robustft.merge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def _ckpt(path: Path, seed: int) -> Path:
    """A two-tensor model folder (model.safetensors + config.json)."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    save_file(
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        str(path / "model.safetensors"),
    )
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _interpolate(start, end, out, *extra) -> list[str]:
    return [
        "interpolate",
        "--start",
        str(start),
        "--end",
        str(end),
        "--alpha",
        "0.5",
        "--out",
        str(out),
        *extra,
    ]


def _merge_recipe(tmp_path: Path, base: Path, models: list[Path]) -> Path:
    recipe = tmp_path / "recipe.yaml"
    models_yaml = "\n".join(f"  - model: {m}" for m in models)
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{models_yaml}\n")
    return recipe


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(out: Path, kind: str, pid: int) -> Path:
    """A leftover ``kind`` (tmp/old) folder of ``out`` as a killed writer ``pid`` of this host leaves it."""
    path = out.with_name(f".{out.name}.{kind}-{checkpoint._HOST}-{pid}-0badc0de")
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"left by pid %d" % pid)
    return path


# -- item 8: an output is never, never contains, and never lies inside an input -----------------------------
@pytest.mark.parametrize("where", ["parent", "same", "inside", "symlink"])
def test_interpolate_refuses_an_output_overlapping_an_input(tmp_path, capsys, where):
    parent = tmp_path / "parent"
    start, end = _ckpt(parent / "base", 0), _ckpt(parent / "ft_a", 1)
    (parent / "notes.txt").write_text("unrelated")
    if where == "symlink":
        (tmp_path / "link").symlink_to(parent, target_is_directory=True)
    out = {"parent": parent, "same": end, "inside": end / "sub", "symlink": tmp_path / "link"}[where]
    before = _snapshot(tmp_path)
    assert main(_interpolate(start, end, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft interpolate: error: output ") and "input" in err, err
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written


def test_merge_refuses_its_own_base_as_output(tmp_path, capsys):
    base, ft = _ckpt(tmp_path / "base", 0), _ckpt(tmp_path / "ft", 1)
    recipe = _merge_recipe(tmp_path, base, [ft])
    before = _snapshot(tmp_path)
    for out in (base, tmp_path):
        assert main(["merge", str(recipe), "--out", str(out), "--overwrite", "--no-progress"]) == 2
        assert "robustft merge: error: output" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged"), "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("out", "inp", "relation"),
    [("a", "a", "is"), ("a", "a/b/c", "contains"), ("a/b", "a", "lies inside"), ("x/../a", "a", "is")],
)
def test_check_output_dir_relations(tmp_path, out, inp, relation):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{relation} the input"):
        check_output_dir(tmp_path / out, True, [tmp_path / inp])
    check_output_dir(tmp_path / "a2", False, [tmp_path / "a"])  # a sibling sharing a prefix is fine


# -- item 9: the umask decides the mode, not mkdtemp -------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_mode(tmp_path, umask):
    start, end = _ckpt(tmp_path / "s", 0), _ckpt(tmp_path / "e", 1)
    old = os.umask(umask)
    try:
        assert main(_interpolate(start, end, tmp_path / "out")) == 0
        with atomic_output_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in [*(tmp_path / "out").iterdir(), tmp_path / "f.json"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def _modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of ``root`` and of everything under it (symlinks excluded)."""
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in entries if not p.is_symlink()}


def _write_lora_compose(tmp_path: Path) -> Path:
    from tests.lora.conftest import make_adapter, save_base

    base = save_base(tmp_path / "base")
    adapters = [make_adapter(base, tmp_path / n, i, r=2,
                              target_modules=["q_proj"]) for i, n in enumerate("ab")]
    assert main(["lora", "add", *map(str, adapters), "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out"


def _write_merge_into(tmp_path: Path) -> Path:
    from tests.lora.conftest import make_adapter, save_base

    base = save_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", 0, r=2, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert main(["lora", "negate", str(adapter), "--merge-into", str(base), "--out", str(out)]) == 0
    return tmp_path / "out"


def _write_gram(tmp_path: Path) -> Path:
    from robustft.merge import Grams, save_gram

    return save_gram(Grams({"w": torch.eye(3)}, {"w": 4}, {"w": 1}), tmp_path / "gram.safetensors")


def _write_fisher(tmp_path: Path) -> Path:
    return save_fisher({"w": torch.ones(3)}, tmp_path / "fisher.safetensors")


def _write_state(tmp_path: Path) -> Path:
    checkpoint.save_state(tmp_path / "ckpt", "ema", {"w": torch.ones(3)}, {"num_updates": 1})
    return tmp_path / "ckpt"


def _write_interpolate(tmp_path: Path) -> Path:
    start, end = _ckpt(tmp_path / "s", 0), _ckpt(tmp_path / "e", 1)
    assert main(_interpolate(start, end, tmp_path / "out")) == 0
    return tmp_path / "out"


def _write_average(tmp_path: Path) -> Path:
    """EMACallback saving the averaged model (save_pretrained) at the end of a 2-step run."""
    from transformers import Trainer

    from robustft import EMACallback
    from tests.tiny import tiny_bert, token_dataset, training_args

    args = training_args(tmp_path / "run", max_steps=2)
    ema = EMACallback(decay=0.5)
    Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(16), callbacks=[ema]).train()
    return tmp_path / "run" / "ema"


def _write_average_plain_module(tmp_path: Path) -> Path:
    """SWACallback saving a plain nn.Module's averaged state dict (safetensors' save_file) to its save_dir."""
    from robustft import SWACallback
    from tests.callbacks.sam_helpers import MLP, NoisyLinearData, make_trainer

    torch.manual_seed(0)
    swa = SWACallback(start=0, save_dir=str(tmp_path / "swa"))
    make_trainer(MLP(), tmp_path / "run", [swa], total_batch=8, steps=2, data=NoisyLinearData(n=16)).train()
    return tmp_path / "swa"


def _write_demo_llm_cache(tmp_path: Path) -> Path:
    """The LLM demo's converted model cache (model_path), the GGUF loading replaced by a tiny Llama."""
    import transformers

    from robustft.demos import llm as demo_llm
    from tests.tiny import tiny_llama

    class Tokenizer:
        def save_pretrained(self, folder):
            Path(folder, "tokenizer.json").write_text("{}")

    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(demo_llm, "gguf_folder", lambda: tmp_path)
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
        return demo_llm.model_path(tmp_path / "cache", verbose=False)
    finally:
        patch.undo()


@pytest.mark.parametrize(
    "write",
    [_write_lora_compose, _write_merge_into, _write_gram, _write_fisher, _write_state, _write_interpolate,
     _write_average, _write_average_plain_module, _write_demo_llm_cache],
)
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_writer_gives_its_files_the_umask_mode(tmp_path, write, umask):
    """docs/outputs.md: files 0o666 & ~umask, folders 0o777 & ~umask, whoever created them (safetensors'
    save_file makes 0o600 files; under umask 022 they must come out 0o644 as any file ``open`` creates)."""
    old = os.umask(umask)
    try:
        out = write(tmp_path)
        with open(tmp_path / "plain", "w"):  # the reference: what the OS gives a new file under this umask
            pass
        os.mkdir(tmp_path / "plain_dir")
    finally:
        os.umask(old)
    file_mode = (tmp_path / "plain").stat().st_mode & 0o777
    dir_mode = (tmp_path / "plain_dir").stat().st_mode & 0o777
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)
    modes = _modes(out)
    assert any((out / name).is_file() and name.endswith(".safetensors") for name in modes) or out.is_file()
    want = {name: dir_mode if (out / name).is_dir() else file_mode for name in modes}
    assert modes == want


def test_apply_umask_leaves_symlinks_and_their_targets_alone(tmp_path):
    outside = tmp_path / "input.bin"
    outside.write_bytes(b"x")
    outside.chmod(0o600)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside)
    (tmp_path / "out" / "f").write_bytes(b"y")
    (tmp_path / "out" / "f").chmod(0o600)
    old = os.umask(0o022)
    try:
        checkpoint.apply_umask(tmp_path / "out")
        assert checkpoint.current_umask() == 0o022
    finally:
        os.umask(old)
    assert outside.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "f").stat().st_mode & 0o777 == 0o644


# -- item 10: disk errors and malformed inputs are reported, not raised ------------------------------------
@pytest.mark.parametrize("call", ["replace", "mkdir"])
def test_disk_errors_are_reported_and_keep_the_old_output(tmp_path, capsys, monkeypatch, call):
    start, end = _ckpt(tmp_path / "s", 0), _ckpt(tmp_path / "e", 1)
    assert main(_interpolate(start, end, tmp_path / "out")) == 0
    before = _snapshot(tmp_path)
    code = errno.ENOSPC if call == "replace" else errno.EROFS

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fail)
    assert main(_interpolate(start, end, tmp_path / "out", "--overwrite")) == 2
    monkeypatch.undo()
    assert capsys.readouterr().err.startswith(
        f"robustft interpolate: error: [Errno {code}] {os.strerror(code)}"
    )
    assert _snapshot(tmp_path) == before  # the old output intact, no temporary left


def _header(entries) -> bytes:
    raw = json.dumps(entries).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(48)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([1, 2], "the header is a list"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w': header entry lacks dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "tensor 'w': shape must be"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'w': data_offsets must be"),
        ({"w": {"dtype": "F32", "shape": [20], "data_offsets": [0, 80]}}, "tensor 'w' is truncated"),
        ({"w": [1]}, "tensor 'w': header entry must be a map"),
        (
            {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
            "tensor 'w': dtype must be a string",
        ),
        ({"__metadata__": {"a": 1}}, "__metadata__ must map names to strings"),
    ],
)
def test_malformed_safetensors_header_is_a_clear_cli_error(tmp_path, capsys, entries, message):
    start = _ckpt(tmp_path / "s", 0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(_header(entries))
    assert main(_interpolate(start, tmp_path / "bad", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft interpolate: error: ") and message in err, err
    assert str(tmp_path / "bad" / "model.safetensors") in err
    assert not (tmp_path / "out").exists()


# -- item 12: bounded error messages, no alias bomb ---------------------------------------------------------
def _python_bomb(levels: int) -> list:
    value: list = ["lol"] * 9
    for _ in range(levels):
        value = [value] * 9
    return value


def test_short_repr_is_bounded_and_exact_for_small_values():
    for small in (0.5, "abc", None, [1, 2], {"density": 0.3}):
        assert short_repr(small) == repr(small)
    assert len(short_repr(_python_bomb(30))) <= 200
    assert len(short_repr("x" * 10**6)) <= 200


def test_recipe_errors_quote_a_bounded_value():
    bomb = _python_bomb(6)  # repr would be 37 MB
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": bomb}}, "b"]}
    with pytest.raises(ValueError, match=r"models\[0\]\.parameters\.weight: .*lists do not nest") as err:
        parse_recipe(data)
    assert len(str(err.value)) < 500


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc for the memory bound")
def test_yaml_alias_bomb_is_refused_promptly(tmp_path):
    # 670 bytes that expand to 9**9 strings if the aliases are followed
    anchors = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        anchors.append(f"&{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: ["
        + ", ".join(anchors)
        + "]\n  - b\n"
    )
    assert len(recipe.read_bytes()) < 1000

    # the child gets 1 GiB of address space beyond what its imports took: plenty to read a recipe
    code = textwrap.dedent(
        f"""
        import resource, sys
        from robustft.cli import main
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
        sys.exit(main(["merge", {str(recipe)!r}, "--out", "o"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "aliases" in proc.stderr and len(proc.stderr) < 1000
    assert not (tmp_path / "o").exists()


# -- item 13: leftovers of killed runs ----------------------------------------------------------------------
def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    stale = _leftover(out, "tmp", _dead_pid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _leftover(out, "tmp", sleeper.pid)
        with pytest.warns(UserWarning, match="delete them by hand"):
            with atomic_output_dir(out) as tmp:
                (tmp / "x").write_text("new")
        assert not stale.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (out / "x").read_text() == "new"


def test_old_output_is_restored_after_a_crash_between_the_renames(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    old = _leftover(out, "old", dead)  # the previous output, set aside
    tmp = _leftover(out, "tmp", dead)  # the new one, never renamed into place
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(FileExistsError, match="already exists"):
            check_output_dir(out, overwrite=False)
    assert (out / "model.safetensors").read_bytes() == b"left by pid %d" % dead
    assert not old.exists() and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_old_copy_beside_a_complete_output_is_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("current")
    _leftover(out, "old", _dead_pid())
    check_output_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "x").read_text() == "current"


def test_files_and_folders_are_fsynced_before_the_final_rename(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    final = events.index(("replace", str(out.resolve())))
    synced = {Path(p).name for kind, p in events[:final] if kind == "fsync"}
    assert {"a.bin", "b.bin", "sub", tmp.name} <= synced
    assert ("fsync", str(tmp_path.resolve())) in events[final:]  # the rename itself made durable


@pytest.mark.parametrize("writer", ["fisher", "state", "text"])
def test_single_files_go_through_the_atomic_helper(tmp_path, monkeypatch, writer):
    target = {"fisher": tmp_path / "f.safetensors", "state": tmp_path / "robustft" / "s.safetensors"}.get(
        writer, tmp_path / "t.json"
    )
    target.parent.mkdir(exist_ok=True)
    stale = target.with_name(f".{target.name}.tmp-{checkpoint._HOST}-{_dead_pid()}-0badc0de{target.suffix}")
    stale.write_bytes(b"half")
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    tensors = {"x": torch.arange(3.0)}
    if writer == "fisher":
        save_fisher(tensors, target)
    elif writer == "state":
        checkpoint.save_state(tmp_path, "s", tensors, {"step": 1})
    else:
        checkpoint.atomic_write_text(target, "{}")
    assert not stale.exists()
    assert any(Path(p).name.startswith(f".{target.name}.tmp-") for p in synced)  # the data, before the rename
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
    if writer != "text":
        assert torch.equal(load_file(str(target))["x"], tensors["x"])


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from robustft.core.checkpoint import atomic_output_dir
    out, between_renames = sys.argv[1], sys.argv[2] == "1"
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if between_renames:  # the old output was moved aside: die before the new one is renamed in
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        if not between_renames:
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("between_renames", [False, True])
def test_a_killed_writer_leaves_nothing_the_next_run_does_not_clean(tmp_path, between_renames):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out), str(int(between_renames))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(tmp_path.iterdir())) == 2  # out + a temporary, or the aside copy + a temporary
    assert out.exists() != between_renames
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FileExistsError):
            check_output_dir(out, overwrite=False)
    assert [str(w.message).endswith("left aside") for w in caught] == ([True] if between_renames else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").read_bytes() == b"old"


def test_average_save_replaces_its_folder_and_refuses_the_output_dir(tmp_path):
    """The averaged model replaces a previous save as a whole (atomic_output_dir), so no stale file of an
    older save stays beside it; a save_dir that is the Trainer's output_dir (which it would replace) is a
    named error that leaves output_dir's files alone."""
    from robustft import SWACallback
    from tests.callbacks.sam_helpers import MLP, NoisyLinearData, make_trainer

    (tmp_path / "swa").mkdir()
    (tmp_path / "swa" / "model-00002-of-00002.safetensors").write_bytes(b"an older save's shard")
    torch.manual_seed(0)
    swa = SWACallback(start=0, save_dir=str(tmp_path / "swa"))
    make_trainer(MLP(), tmp_path / "run", [swa], total_batch=8, steps=2, data=NoisyLinearData(n=16)).train()
    assert sorted(p.name for p in (tmp_path / "swa").iterdir()) == ["model.safetensors"]
    (tmp_path / "run" / "notes.txt").write_text("keep")
    trainer = make_trainer(MLP(), tmp_path / "run", [SWACallback(start=0, save_dir=str(tmp_path / "run"))],
                           total_batch=8, steps=2, data=NoisyLinearData(n=16))
    with pytest.raises(ValueError, match="SWACallback: save_dir .* is or contains the Trainer's output_dir"):
        trainer.train()
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep"
