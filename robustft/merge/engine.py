"""Streamed merge of whole checkpoints: one straight loop over tensor names.

For each tensor name: read it from the base and every model (and its Fisher or Gram statistics), upcast
to float32 (float64 stays), apply the tensor function of the recipe's method (or an override's) from the
merge-method registry (``robustft.ops.registry``), cast to the output dtype and append it to the output
shard. Non-floating tensors must be equal in every model and are copied. Everything that can be wrong is
checked first, from the safetensors headers (names, shapes, Fisher and Gram files, override patterns, the
output folder), before any file is written; an error while merging (a singular RegMean system) names the
tensor and leaves no output folder.
Tensors are merged by a few threads at once (``workers``) and written in order; peak memory is about
(inputs + 1) x the largest tensor in float32 (docs/merging.md, "Memory"; RegMean: plus the float64
solve of one weight and one Gram per model at a time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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


def _ordered_map(
    fn: Callable[[str], torch.Tensor], items: list[str], costs: list[int], budget: int, workers: int
) -> Iterator[torch.Tensor]:
    """``fn(item)`` for each item, yielded in order, computed by up to ``workers`` threads (torch releases
    the GIL) while the summed ``costs`` of the items in flight (computed, not yet consumed) stay within
    ``budget``; one item at a time is always allowed. Torch runs single-threaded meanwhile (no
    oversubscription: the workers are the parallelism)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[tuple[Future, int]] = deque()
            in_flight = 0
            for item, cost in zip(items, costs, strict=True):
                while pending and (in_flight + cost > budget or len(pending) >= 2 * workers):
                    in_flight -= pending[0][1]
                    yield pending.popleft()[0].result()  # no name keeps the result alive here
                pending.append((pool.submit(fn, item), cost))
                in_flight += cost
            while pending:
                yield pending.popleft()[0].result()
    finally:
        torch.set_num_threads(threads)


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
    recipe: Recipe,
    ref: CheckpointReader,
    readers: list[CheckpointReader],
    label: list[str],
    free_rows: frozenset[str] | tuple = (),
) -> None:
    """Same tensor names and shapes everywhere (but the vocabulary rows of ``free_rows``), checked on headers
    only; the error names tensor and model."""
    for reader, who in zip(readers, label[1:], strict=True):
        diff = layout_difference(ref, reader, exact_dtype=False, free_rows=free_rows)
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
    workers: int | None = None,
) -> MergeResult:
    """Merge the checkpoints of ``recipe`` (a ``Recipe`` or a YAML path) into the folder ``out_dir``.

    The output holds sharded safetensors (+ index), the reference model's config and tokenizer files and
    the recipe (``robustft_merge.yaml``); it is built in a temporary sibling folder and renamed into place.
    ``layout_from`` (one of the recipe's inputs) makes the output copy that checkpoint's tensor order,
    dtypes, shard files, metadata and config instead (``robustft interpolate`` follows the fine-tuned end);
    ``info_files`` are extra small text files (name -> content) written into the output.
    ``workers`` tensors are merged at once (default: ``torch.get_num_threads()``, each worker then running
    torch single-threaded), as long as their inputs fit in the memory of the largest tensor's merge.
    """
    start = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.slices:
        return _stack_layers(recipe, out_dir, overwrite, max_shard_size, progress, start)
    tok = None if recipe.tokenizer_source == "base" else recipe.tokenizer_source
    inputs = [recipe.reference_model, *(m.path for m in recipe.models), tok]
    inputs += recipe.tokenizer.paths() if recipe.tokenizer is not None else []
    check_output_dir(out_dir, overwrite, inputs)
    shard_size = max_shard_size or recipe.max_shard_size or "5GB"
    workers = torch.get_num_threads() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")

    with ExitStack() as stack:
        ref_path = recipe.reference_model
        ref = stack.enter_context(CheckpointReader(ref_path))
        readers = [stack.enter_context(CheckpointReader(m.path)) for m in recipe.models]
        who = [f"base_model {ref_path}" if recipe.base_model else f"models[0] {ref_path}"]
        who += [f"models[{i}] {m.path}" for i, m in enumerate(recipe.models)]
        by_path = {**{m.path: r for m, r in zip(recipe.models, readers, strict=True)}, ref_path: ref}
        vocab = None  # mergekit's output vocabulary: embedding rows mapped onto it as they are read
        if recipe.tokenizer is not None:
            from robustft.merge.tokenizer import build_vocabulary

            vocab = build_vocabulary(recipe.tokenizer, recipe.base_model, list(by_path), by_path)
        _check_inputs(recipe, ref, readers, who, vocab.tensors if vocab is not None else ())
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
            plan.append((name, info.shape if vocab is None else vocab.shape(name, info.shape), dtype))

        with atomic_output_dir(out_dir, overwrite, [*inputs, *fisher_readers, *gram_files]) as tmp:
            shards, metadata = None, {"merged_by": "robustft"}
            if layout_from is not None:
                shards = {n: i.file.name for n, i in layout.infos.items()}
                metadata = {**layout.metadata, **metadata}

            def merge_one(name: str) -> torch.Tensor:
                info = layout.infos[name]
                if not info.dtype.is_floating_point:
                    return kept_tensor(name, [ref.get(name), *[r.get(name) for r in readers]], who)
                method, gparams, mparams = resolved[choice[name]]
                compute = work_dtype(info.dtype)
                read = (lambda r: r.get(name)) if vocab is None else vocab.reads(name, by_path, compute)
                base = read(ref).to(compute) if recipe.base_model is not None else None
                if method == "base":
                    return base
                tensors = [read(r).to(compute) for r in readers]
                stats, transposed = None, False
                if method == "fisher":
                    stats = [fisher_readers[p["fisher"]].get(name).to(compute) for p in mparams]
                elif method == "regmean" and name in grams_of[choice[name]][0]:
                    files = grams_of[choice[name]]
                    stats = (f.mean(name) for f in files)  # one Gram in memory at a time
                    # GPT-2's Conv1D stores (in, out): RegMean works on (out, in)
                    transposed = files[0].input_axis[name] == 0
                    tensors = [t.T for t in tensors] if transposed else tensors
                try:  # data errors (NaN under a top-k cut, a singular RegMean system): name the tensor
                    merged = merge_tensor(
                        method, base, tensors, gparams, mparams, tensor_seed(recipe.seed, name), stats
                    )
                except ValueError as err:
                    raise ValueError(f"tensor {name!r} ({method}): {err}") from err
                return merged.T if transposed else merged

            # a tensor in flight holds its inputs and its result: (inputs + 1) x its entries; a RegMean
            # weight also one Gram (in x in) per model and the float64 system (2 float32 units per entry)
            n_inputs = 1 + len(readers) + len(fisher_readers)

            def cost(name: str, shape: tuple[int, ...]) -> int:
                entries = (n_inputs + 1) * math.prod(shape)
                files = grams_of.get(choice.get(name))
                if files and name in files[0]:
                    n_in = shape[files[0].input_axis[name]]
                    entries += (len(files) + 2 * 2) * n_in * n_in
                return entries

            costs = [cost(name, shape) for name, shape, _ in plan]
            budget = max(costs, default=0)  # the largest tensor alone, or several smaller ones together
            with ShardedWriter(tmp, plan, shard_size, metadata, shards) as writer:
                merged_in_order = _ordered_map(merge_one, [n for n, _, _ in plan], costs, budget, workers)
                for (name, _, dtype), merged in zip(
                    plan, tqdm(merged_in_order, total=len(plan), desc="merging", unit="tensor",
                               disable=not progress), strict=True,
                ):  # fmt: skip
                    writer.write(name, merged.to(dtype))
                    del merged
            side_tok = src_tok if vocab is None else None  # a built vocabulary writes its own tokenizer
            copy_side_files(layout.path if layout_from is not None else ref_path, side_tok, tmp, out_dtype)
            if vocab is not None:
                vocab.write(tmp)
            (tmp / "robustft_merge.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
            for fname, text in (info_files or {}).items():
                (tmp / fname).write_text(text)
            files = list(writer.files)
    return MergeResult(Path(out_dir), len(plan), files, time.perf_counter() - start)


#: a transformer block's tensor: prefix, layer index, rest ("model.layers.3.mlp.up_proj.weight")
_LAYER = re.compile(r"^(.*\blayers\.)(\d+)(\..+)$")


def _stack_layers(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    overwrite: bool,
    max_shard_size: int | str | None,
    progress: bool,
    start: float,
) -> MergeResult:
    """Layer stacking (mergekit's ``passthrough`` with ``slices``): the slices' layers, renumbered from 0,
    with the embeddings ("embed" in the name) of the first slice's model and the other non-layer tensors
    (final norm, head) of the last slice's, as mergekit plans Llama-family models; the config is the first
    slice model's with ``num_hidden_layers`` (and ``layer_types``) for the stack."""
    paths = list(dict.fromkeys(s.path for s in recipe.slices))
    tok = recipe.reference_model if recipe.tokenizer_source == "base" else recipe.tokenizer_source
    check_output_dir(out_dir, overwrite, [*paths, tok])
    readers = {p: CheckpointReader(p) for p in paths}
    configs = {}
    for path, reader in readers.items():
        config = reader.folder / "config.json"
        configs[path] = json.loads(config.read_text()) if config.is_file() else {}
        if "num_hidden_layers" not in configs[path]:
            raise ValueError(f"slices: {path} has no config.json with num_hidden_layers")
        odd = [n for n in reader.names if not _LAYER.match(n) and ".layers." in n]
        if odd or not any(_LAYER.match(n) for n in reader.names):
            raise ValueError(
                f"slices: {path} does not name its blocks '<prefix>.layers.<i>.' (Llama-family layout); "
                "layer stacking supports those only"
            )
    first, last = recipe.slices[0].path, recipe.slices[-1].path
    sources: list[tuple[str, str, str]] = []  # (output name, model path, input name)
    others = [n for n in readers[first].names if not _LAYER.match(n)]
    sources += [(n, first, n) for n in others if "embed" in n]
    out_layer = 0
    layer_types: list = []
    for i, piece in enumerate(recipe.slices):
        total = configs[piece.path]["num_hidden_layers"]
        if piece.end > total:
            raise ValueError(
                f"slices[{i}].sources[0].layer_range: [{piece.start}, {piece.end}] goes beyond the "
                f"{total} layers of {piece.path}"
            )
        names = readers[piece.path].names
        for layer in range(piece.start, piece.end):
            for n in names:
                m = _LAYER.match(n)
                if m and int(m.group(2)) == layer:
                    sources.append((f"{m.group(1)}{out_layer}{m.group(3)}", piece.path, n))
            out_layer += 1
        types = configs[piece.path].get("layer_types")
        if isinstance(types, list):
            layer_types += types[piece.start : piece.end]
    tail = [n for n in readers[last].names if not _LAYER.match(n) and "embed" not in n]
    sources += [(n, last, n) for n in tail]
    out_dtype = recipe.dtype
    scale = recipe.resolve()[2][0]["scale"]
    plan = []
    for name, path, src in sources:
        info = readers[path].infos[src]
        floating = info.dtype.is_floating_point
        plan.append((name, info.shape, out_dtype if out_dtype is not None and floating else info.dtype))
    shard_size = max_shard_size or recipe.max_shard_size or "5GB"
    with atomic_output_dir(out_dir, overwrite, [*paths, tok]) as tmp:
        with ShardedWriter(tmp, plan, shard_size, {"merged_by": "robustft"}) as writer:
            items = zip(plan, sources, strict=True)
            for (name, _, dtype), (_, path, src) in tqdm(
                list(items), desc="stacking", unit="tensor", disable=not progress
            ):
                tensor = readers[path].get(src)
                if scale is not None and tensor.dtype.is_floating_point:
                    tensor = tensor.to(work_dtype(tensor.dtype)).mul_(scale)
                writer.write(name, tensor.to(dtype))
        copy_side_files(first, tok, tmp, out_dtype)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["num_hidden_layers"] = out_layer
        if "layer_types" in config:
            config["layer_types"] = layer_types
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "robustft_merge.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
        files = list(writer.files)
    return MergeResult(Path(out_dir), len(plan), files, time.perf_counter() - start)
