"""Streamed merge of whole checkpoints: one straight loop over tensor names.

For each tensor name: read it from the base and every model (and its Fisher or Gram statistics), upcast
to float32 (float64 stays), apply the tensor function of the recipe's method (or an override's) from the
merge-method registry (``robustft.ops.registry``), cast to the output dtype and append it to the output
shard. Non-floating tensors must be equal in every model and are copied. Everything that can be wrong is
checked first, from the safetensors headers (names, shapes, Fisher and Gram files, override patterns, the
output folder), before any file is written; an error while merging (a singular RegMean system) names the
tensor and leaves no output folder.
Peak memory is about (inputs + 3) x the largest tensor in float32 (RegMean: plus two in x in float64
matrices and one Gram at a time).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from robustft.checkpoint import atomic_output_dir, check_output_dir
from robustft.merge.fisher import GramFile
from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files, layout_difference
from robustft.merge.recipe import Override, Recipe, load_recipe
from robustft.ops.interpolate import kept_tensor, work_dtype
from robustft.ops.registry import method_spec

__all__ = ["MergeResult", "merge_checkpoints", "merge_tensor", "tensor_seed"]


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    files: list[str]
    seconds: float


def tensor_seed(seed: int, name: str) -> int:
    """Seed for tensor ``name``: stable across runs, machines and tensor order (sha256 of seed and name)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge_tensor(
    method: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    gparams: dict,
    mparams: list[dict],
    seed: int = 0,
    fishers: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merged weights of one tensor under ``method`` (a key of ``robustft.ops.registry.METHODS``).

    ``fishers``: the models' statistics of this tensor, where the method uses some: diagonal Fishers
    (``fisher``), or mean input Gram matrices in (in, in) for (out, in) weights (``regmean``; an iterable
    read one at a time; None merges the tensor by the weighted mean).
    Memory over purity: ``base`` and the ``tensors`` (and list entries) may be modified in place.
    """
    return method_spec("merge_method", method).apply(base, tensors, gparams, mparams, seed, fishers)


def _override_for(name: str, overrides: list[Override]) -> int | None:
    for i, o in enumerate(overrides):
        if o.pattern.search(name):
            return i
    return None


def _gram_files(
    rule: int,
    mparams: list[dict],
    opened: dict[str, GramFile],
    names: list[str],
    choice: dict[str, int | None],
    ref: CheckpointReader,
) -> list[GramFile]:
    """The Gram files of a ``regmean`` rule (opened once per path), checked against the tensors it merges:
    every model has a Gram for a tensor or none does, each fits the weight's shape, the models agree on the
    weight's input axis, and at least one tensor has Grams."""
    files = []
    for k, p in enumerate(mparams):
        if p["gram"] not in opened:
            opened[p["gram"]] = GramFile(p["gram"], f"models[{k}] gram")
        files.append(opened[p["gram"]])
    with_gram = 0
    for name in names:
        if choice[name] != rule or not ref.infos[name].dtype.is_floating_point:
            continue
        have = [name in f for f in files]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(
                f"tensor {name!r} has a Gram in {files[have.index(True)].path} but none in "
                f"{files[have.index(False)].path}: RegMean needs one from every model (or none: the mean)"
            )
        for f in files:
            f.check(name, ref.infos[name].shape)
        if len({f.input_axis[name] for f in files}) > 1:
            raise ValueError(f"tensor {name!r}: the Gram files disagree on the weight's input axis")
        with_gram += 1
    if with_gram == 0:
        paths = ", ".join(sorted({str(f.path) for f in files}))
        raise ValueError(
            f"regmean: no tensor it merges has a Gram in {paths} (the Grams' names must be the "
            "checkpoint's weight names, as estimate_gram writes them)"
        )
    return files


def _check_inputs(
    recipe: Recipe, ref: CheckpointReader, readers: list[CheckpointReader], label: list[str]
) -> None:
    """Same tensor names and shapes everywhere, checked on headers only; the error names tensor and model."""
    for reader, who in zip(readers, label[1:], strict=True):
        diff = layout_difference(ref, reader, exact_dtype=False)
        if diff is not None:
            raise ValueError(diff.describe(label[0], who))


def merge_checkpoints(
    recipe: Recipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    progress: bool = True,
    layout_from: str | os.PathLike | None = None,
    info_files: Mapping[str, str] | None = None,
) -> MergeResult:
    """Merge the checkpoints of ``recipe`` (a ``Recipe`` or a YAML path) into the folder ``out_dir``.

    The output holds sharded safetensors (+ index), the reference model's config and tokenizer files and
    the recipe (``robustft_merge.yaml``); it is built in a temporary sibling folder and renamed into place.
    ``layout_from`` (one of the recipe's inputs) makes the output copy that checkpoint's tensor order,
    dtypes, shard files, metadata and config instead (``robustft interpolate`` follows the fine-tuned end);
    ``info_files`` are extra small text files (name -> content) written into the output.
    """
    start = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    tok = None if recipe.tokenizer_source == "base" else recipe.tokenizer_source
    inputs = [recipe.reference_model, *(m.path for m in recipe.models), tok]
    check_output_dir(out_dir, overwrite, inputs)
    shard_size = max_shard_size or recipe.max_shard_size or "5GB"

    with ExitStack() as stack:
        ref_path = recipe.reference_model
        ref = stack.enter_context(CheckpointReader(ref_path))
        readers = [stack.enter_context(CheckpointReader(m.path)) for m in recipe.models]
        who = [f"base_model {ref_path}" if recipe.base_model else f"models[0] {ref_path}"]
        who += [f"models[{i}] {m.path}" for i, m in enumerate(recipe.models)]
        _check_inputs(recipe, ref, readers, who)
        layout = ref
        if layout_from is not None:
            layout = next((r for r in [ref, *readers] if r.path == Path(layout_from)), None)
            if layout is None:
                raise ValueError(f"layout_from: {layout_from} is not one of the recipe's checkpoints")

        names = layout.names
        # which rule each tensor gets; every override pattern must match something
        choice = {name: _override_for(name, recipe.overrides) for name in names}
        for i, o in enumerate(recipe.overrides):
            if i not in choice.values():
                hit = any(o.pattern.search(n) for n in names)
                reason = "is shadowed by an earlier override" if hit else "matches no tensor"
                raise ValueError(f"overrides[{i}].pattern {o.pattern.pattern!r} {reason} of {ref_path}")
        resolved = {
            i: recipe.resolve(None if i is None else recipe.overrides[i]) for i in set(choice.values())
        }

        fisher_readers: dict[str, CheckpointReader] = {}
        for i, (method, _, mparams) in resolved.items():
            if method != "fisher":
                continue
            for k, p in enumerate(mparams):
                path = p["fisher"]
                if path not in fisher_readers:
                    fisher_readers[path] = stack.enter_context(CheckpointReader(path))
                fr = fisher_readers[path]
                for name in names:
                    if choice[name] != i or not ref.infos[name].dtype.is_floating_point:
                        continue
                    if name not in fr.infos:
                        raise ValueError(f"Fisher file {path} (models[{k}]) has no tensor {name!r}")
                    if fr.infos[name].shape != ref.infos[name].shape:
                        raise ValueError(
                            f"Fisher tensor {name!r} in {path} has shape {fr.infos[name].shape}, "
                            f"expected {ref.infos[name].shape}"
                        )

        gram_files: dict[str, GramFile] = {}
        grams_of = {
            i: _gram_files(i, mparams, gram_files, names, choice, ref)
            for i, (method, _, mparams) in resolved.items()
            if method == "regmean"
        }

        src_tok = ref_path if recipe.tokenizer_source == "base" else recipe.tokenizer_source
        if src_tok is not None and not Path(src_tok).is_dir():
            raise FileNotFoundError(f"tokenizer_source {src_tok} is not a folder")

        out_dtype = recipe.dtype
        plan = []
        for name in names:
            info = layout.infos[name]
            dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
            plan.append((name, info.shape, dtype))

        with atomic_output_dir(out_dir, overwrite, [*inputs, *fisher_readers, *gram_files]) as tmp:
            shards, metadata = None, {"merged_by": "robustft"}
            if layout_from is not None:
                shards = {n: i.file.name for n, i in layout.infos.items()}
                metadata = {**layout.metadata, **metadata}
            with ShardedWriter(tmp, plan, shard_size, metadata, shards) as writer:
                for name, _, dtype in tqdm(plan, desc="merging", unit="tensor", disable=not progress):
                    info = layout.infos[name]
                    if not info.dtype.is_floating_point:
                        kept = kept_tensor(name, [ref.get(name), *[r.get(name) for r in readers]], who)
                        writer.write(name, kept)
                        continue
                    method, gparams, mparams = resolved[choice[name]]
                    compute = work_dtype(info.dtype)
                    base = ref.get(name).to(compute) if recipe.base_model is not None else None
                    if method == "base":
                        merged = base
                    else:
                        tensors = [r.get(name).to(compute) for r in readers]
                        stats, transposed = None, False
                        if method == "fisher":
                            stats = [fisher_readers[p["fisher"]].get(name).to(compute) for p in mparams]
                        elif method == "regmean" and name in grams_of[choice[name]][0]:
                            files = grams_of[choice[name]]
                            stats = (f.mean(name) for f in files)  # one Gram in memory at a time
                            # GPT-2's Conv1D stores (in, out): RegMean works on (out, in)
                            transposed = files[0].input_axis[name] == 0
                            tensors = [t.T for t in tensors] if transposed else tensors
                        try:
                            merged = merge_tensor(
                                method, base, tensors, gparams, mparams, tensor_seed(recipe.seed, name), stats
                            )
                        except ValueError as err:
                            raise ValueError(f"tensor {name!r} ({method}): {err}") from err
                        merged = merged.T if transposed else merged
                        del tensors, stats
                    writer.write(name, merged.to(dtype))
                    del merged, base
            copy_side_files(layout.path if layout_from is not None else ref_path, src_tok, tmp, out_dtype)
            (tmp / "robustft_merge.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
            for fname, text in (info_files or {}).items():
                (tmp / fname).write_text(text)
            files = list(writer.files)
    return MergeResult(Path(out_dir), len(plan), files, time.perf_counter() - start)
