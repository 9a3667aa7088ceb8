"""Streamed merge of whole checkpoints: one straight loop over tensor names.

For each tensor name: read it from the base and every model (and its Fisher or Gram statistics), upcast
to float32 (float64 stays), apply the tensor function of the recipe's method (or an override's) from the
merge-method registry (``robustft.merge.registry``), cast to the output dtype and append it to the output
shard. Non-floating tensors must be equal in every model and are copied. Everything that can be wrong is
checked first, from the safetensors headers (names, shapes, Fisher and Gram files, override patterns, the
output folder), before any file is written; an error while merging (a singular RegMean system) names the
tensor and leaves no output folder.
Tensors are merged by a few threads at once (``workers``) and written in order; peak memory is about
(inputs + 1) x the largest tensor in float32 (docs/merging.md, "Memory"; RegMean: plus the float64
solve of one weight and one Gram per model at a time).
"""

from __future__ import annotations

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
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from robustft.core.checkpoint import atomic_output_dir, check_output_dir
from robustft.merge.io import (
    CheckpointReader,
    GramFile,
    ShardedWriter,
    copy_side_files,
    layout_difference,
    model_layout,
    resolve_model,
    write_chat_template,
)
from robustft.merge.recipe import (
    LayerSlice,
    OutputSlice,
    Override,
    Recipe,
    check_resolved,
    is_dynamic,
    load_recipe,
)
from robustft.merge.registry import method_spec, tensor_seed
from robustft.ops.dtypes import compute_dtype
from robustft.ops.interpolate import kept_tensor

__all__ = [
    "MergeResult",
    "TiedView",
    "layer_position",
    "merge_checkpoints",
    "merge_tensor",
    "merged_tensors",
    "tensor_seed",
    "tie_missing_heads",
]


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    files: list[str]
    seconds: float


def merge_tensor(
    method: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    gparams: dict,
    mparams: list[dict],
    seed: int = 0,
    fishers: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merged weights of one tensor under ``method`` (a key of ``robustft.merge.registry.METHODS``).

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


def _write_in_order(
    writer: ShardedWriter, plan: list[tuple], merged: Iterator[torch.Tensor], progress: bool
) -> None:
    """Write the merged tensors in the plan's order, each cast to its output dtype and dropped at once."""
    bar = tqdm(merged, total=len(plan), desc="merging", unit="tensor", disable=not progress)
    for (name, _, dtype), tensor in zip(plan, bar, strict=True):
        writer.write(name, tensor.to(dtype))
        del tensor


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


class TiedView:
    """A checkpoint whose missing output embedding (``lm_head.weight``) reads as its input embedding, as
    mergekit reads a tied model where another input has an untied head (its architectures' ``tied_names``);
    everything else is the wrapped reader's."""

    def __init__(self, reader: CheckpointReader, alias: Mapping[str, str]) -> None:
        self.reader, self.alias = reader, dict(alias)
        self.names = [*reader.names, *(a for a in self.alias if a not in reader.infos)]
        self.infos = {**reader.infos, **{a: reader.infos[t] for a, t in self.alias.items()}}

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self.alias.get(name, name))

    def get_rows(self, name: str, rows) -> torch.Tensor:
        return self.reader.get_rows(self.alias.get(name, name), rows)

    def __getattr__(self, attr: str):
        return getattr(self.reader, attr)


def tie_missing_heads(readers: list, group: list | None = None) -> tuple[list, str | None]:
    """``readers`` with every one that lacks the output embedding (a tied model) read through
    :class:`TiedView` when some reader of ``group`` (default: all) has one, as mergekit plans the optional
    ``lm_head`` (written when any gathered input has it); also the output embedding's name (None when the
    layouts agree or the architecture is unknown: the layout check then names the difference)."""
    group = readers if group is None else group
    if all(set(r.infos) == set(readers[0].infos) for r in readers):
        return readers, None
    from robustft.merge.tokenizer import embedding_names

    try:
        pair = embedding_names(readers[0].folder)
    except ValueError:
        return readers, None
    if pair is None:
        return readers, None
    inp, out = pair
    if not any(out in r.infos for r in group):
        return readers, out
    return [r if out in r.infos or inp not in r.infos else TiedView(r, {out: inp}) for r in readers], out


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


@dataclass
class _Inputs:
    """The opened checkpoints of a recipe without slices: the reference, the models, their labels for
    errors, the readers by local folder, the output vocabulary (or None) and the checkpoint whose layout
    the output copies."""

    ref_path: Path
    ref: CheckpointReader
    readers: list[CheckpointReader]
    who: list[str]
    by_path: dict[str, CheckpointReader]
    vocab: Any
    layout: CheckpointReader


def _open_inputs(
    recipe: Recipe, local: Mapping[str, Path], layout_from: str | os.PathLike | None, stack: ExitStack,
    open_reader: Callable[[Path], CheckpointReader] = CheckpointReader,
) -> _Inputs:
    """Open the recipe's checkpoints (closed with ``stack``; ``open_reader`` opens one), build its output
    vocabulary and check that names and shapes agree, reading headers only."""
    ref_path = local[recipe.reference_model]
    ref = model_layout(stack.enter_context(open_reader(ref_path)))
    readers = [model_layout(stack.enter_context(open_reader(local[m.path]))) for m in recipe.models]
    ref, *readers = tie_missing_heads([ref, *readers])[0]
    who = [f"base_model {recipe.reference_model}" if recipe.base_model else f"models[0] {ref_path}"]
    who += [f"models[{i}] {m.path}" for i, m in enumerate(recipe.models)]
    # keyed by local folder (a Hub id's snapshot), as the tokenizer plan reads them
    by_path = {str(local[m.path]): r for m, r in zip(recipe.models, readers, strict=True)}
    by_path[str(ref_path)] = ref
    vocab = None  # mergekit's output vocabulary: embedding rows mapped onto it as they are read
    if recipe.tokenizer is not None:
        from robustft.merge.tokenizer import build_vocabulary

        base = str(ref_path) if recipe.base_model is not None else None
        vocab = build_vocabulary(recipe.tokenizer, base, list(by_path), by_path)
    _check_inputs(recipe, ref, readers, who, vocab.tensors if vocab is not None else ())
    layout = ref
    if layout_from is not None:
        layout = next((r for r in [ref, *readers] if r.path == Path(layout_from)), None)
        if layout is None:
            raise ValueError(f"layout_from: {layout_from} is not one of the recipe's checkpoints")
    return _Inputs(ref_path, ref, readers, who, by_path, vocab, layout)


def _tensor_rules(recipe: Recipe, names: list[str], ref_path: Path) -> tuple[dict[str, int | None], dict]:
    """Which rule (override index, None for the recipe's own) each tensor gets, and each rule resolved;
    every override pattern must match a tensor no earlier override takes."""
    choice = {name: _override_for(name, recipe.overrides) for name in names}
    for i, o in enumerate(recipe.overrides):
        if i not in choice.values():
            hit = any(o.pattern.search(n) for n in names)
            reason = "is shadowed by an earlier override" if hit else "matches no tensor"
            raise ValueError(f"overrides[{i}].pattern {o.pattern.pattern!r} {reason} of {ref_path}")
    resolved = {i: recipe.resolve(None if i is None else recipe.overrides[i]) for i in set(choice.values())}
    return choice, resolved


def _fisher_readers(
    resolved: Mapping, names: list[str], choice: Mapping[str, int | None], ref: CheckpointReader,
    stack: ExitStack, open_reader: Callable[[Path], CheckpointReader] = CheckpointReader,
) -> dict[str, CheckpointReader]:
    """The Fisher files of the rules merged with ``fisher``, opened (closed with ``stack``) and checked to
    hold every floating tensor those rules merge, with its shape."""
    readers: dict[str, CheckpointReader] = {}
    for i, (method, _, mparams) in resolved.items():
        if method != "fisher":
            continue
        for k, p in enumerate(mparams):
            path = p["fisher"]
            if path not in readers:
                readers[path] = stack.enter_context(open_reader(Path(path)))
            fr = readers[path]
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
    return readers


def _output_plan(inputs: _Inputs, names: list[str], out_dtype: torch.dtype | None) -> list[tuple]:
    """(name, shape, dtype) of each output tensor: the layout's, floating tensors in ``out_dtype`` when
    given, embedding rows as many as the output vocabulary's."""
    plan = []
    for name in names:
        info = inputs.layout.infos[name]
        dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        shape = info.shape if inputs.vocab is None else inputs.vocab.shape(name, info.shape)
        plan.append((name, shape, dtype))
    return plan


def _merge_one(
    name: str, recipe: Recipe, inputs: _Inputs, params_of: Mapping, fisher_readers: Mapping,
    grams_of: Mapping, choice: Mapping[str, int | None],
) -> torch.Tensor:
    """The merged tensor ``name``: kept when not floating, else its rule's method on the inputs read in the
    compute dtype (with its Fisher or Gram statistics); a data error names the tensor."""
    ref, readers, vocab = inputs.ref, inputs.readers, inputs.vocab
    info = inputs.layout.infos[name]
    if not info.dtype.is_floating_point:
        return kept_tensor(name, [ref.get(name), *[r.get(name) for r in readers]], inputs.who)
    method, gparams, mparams = params_of[name]
    compute = compute_dtype(info.dtype)
    read = (lambda r: r.get(name)) if vocab is None else vocab.reads(name, inputs.by_path, compute)
    base = _cast(read(ref), recipe.dtype, compute) if recipe.base_model is not None else None
    if method == "base":
        return base
    tensors = [_cast(read(r), recipe.dtype, compute) for r in readers]
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
        merged = merge_tensor(method, base, tensors, gparams, mparams, tensor_seed(recipe.seed, name), stats)
    except ValueError as err:
        raise ValueError(f"tensor {name!r} ({method}): {err}") from err
    return merged.T if transposed else merged


def _tensor_costs(
    plan: list[tuple], n_inputs: int, grams_of: Mapping, choice: Mapping[str, int | None]
) -> list[int]:
    """Memory units of each tensor in flight: its inputs and its result, (inputs + 1) x its entries; a
    RegMean weight also one Gram (in x in) per model and the float64 system (2 float32 units per entry)."""
    costs = []
    for name, shape, _ in plan:
        entries = (n_inputs + 1) * math.prod(shape)
        files = grams_of.get(choice.get(name))
        if files and name in files[0]:
            n_in = shape[files[0].input_axis[name]]
            entries += (len(files) + 2 * 2) * n_in * n_in
        costs.append(entries)
    return costs


@dataclass
class _Prepared:
    """A recipe without slices ready to merge: its opened inputs, the output's tensor names, each tensor's
    rule and resolved parameters, and the statistics files."""

    inputs: _Inputs
    names: list[str]
    choice: dict[str, int | None]
    params_of: dict[str, tuple[str, dict, list[dict]]]
    fisher_readers: dict[str, CheckpointReader]
    gram_files: dict[str, GramFile]
    grams_of: dict[int | None, list[GramFile]]


def _prepare(
    recipe: Recipe, local: Mapping[str, Path], layout_from: str | os.PathLike | None, stack: ExitStack,
    open_reader: Callable[[Path], CheckpointReader],
) -> _Prepared:
    """Open and check everything a merge of ``recipe`` (no slices) reads, before any tensor is merged."""
    inputs = _open_inputs(recipe, local, layout_from, stack, open_reader)
    names = inputs.layout.names
    choice, resolved = _tensor_rules(recipe, names, inputs.ref_path)
    params_of = _tensor_parameters(recipe, inputs.ref, names, choice, resolved)
    fisher_readers = _fisher_readers(resolved, names, choice, inputs.ref, stack, open_reader)
    gram_files: dict[str, GramFile] = {}
    grams_of = {
        i: _gram_files(i, mparams, gram_files, names, choice, inputs.ref)
        for i, (method, _, mparams) in resolved.items()
        if method == "regmean"
    }
    return _Prepared(inputs, names, choice, params_of, fisher_readers, gram_files, grams_of)


def merged_tensors(
    recipe: Recipe, open_reader: Callable[[Path], CheckpointReader] = CheckpointReader
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every tensor of ``recipe`` (no slices), in the reference model's order,
    computed as :func:`merge_checkpoints` computes them but not cast to the output dtype nor written.

    ``open_reader(folder)`` opens one input (default: a streamed :class:`CheckpointReader`; ``robustft
    search`` gives checkpoints read into memory once, :class:`robustft.merge.io.LoadedCheckpoint`). Every
    check runs before the first tensor is yielded.
    """
    if recipe.slices:
        raise ValueError("merged_tensors: slices are not supported (merge_checkpoints writes them)")
    local = _local_paths(recipe)
    with ExitStack() as stack:
        p = _prepare(recipe, local, None, stack, open_reader)
        for name in p.names:
            yield name, _merge_one(
                name, recipe, p.inputs, p.params_of, p.fisher_readers, p.grams_of, p.choice
            )


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
    workers = torch.get_num_threads() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if recipe.slices:
        if layout_from is not None or info_files:
            raise ValueError("layout_from and info_files are not supported with slices")
        return _merge_slices(recipe, out_dir, overwrite, max_shard_size, progress, workers, start)
    local = _local_paths(recipe)
    tok = None if recipe.tokenizer_source == "base" else recipe.tokenizer_source
    paths = [local[recipe.reference_model], *(local[m.path] for m in recipe.models), tok]
    paths += recipe.tokenizer.paths() if recipe.tokenizer is not None else []
    check_output_dir(out_dir, overwrite, paths)
    shard_size = max_shard_size or recipe.max_shard_size or "5GB"

    with ExitStack() as stack:
        p = _prepare(recipe, local, layout_from, stack, CheckpointReader)
        inputs, names, choice, params_of = p.inputs, p.names, p.choice, p.params_of
        fisher_readers, gram_files, grams_of = p.fisher_readers, p.gram_files, p.grams_of
        ref_path, layout, vocab = inputs.ref_path, inputs.layout, inputs.vocab
        src_tok = ref_path if recipe.tokenizer_source == "base" else local.get(tok, tok)
        if src_tok is not None and not Path(src_tok).is_dir():
            raise FileNotFoundError(f"tokenizer_source {src_tok} is not a folder")
        out_dtype = recipe.out_dtype or recipe.dtype
        plan = _output_plan(inputs, names, out_dtype)

        with atomic_output_dir(out_dir, overwrite, [*paths, *fisher_readers, *gram_files]) as tmp:
            shards, metadata = None, {"merged_by": "robustft"}
            if layout_from is not None:
                shards = {n: i.file.name for n, i in layout.infos.items()}
                metadata = {**layout.metadata, **metadata}

            def merge_one(name: str) -> torch.Tensor:
                return _merge_one(name, recipe, inputs, params_of, fisher_readers, grams_of, choice)

            costs = _tensor_costs(plan, 1 + len(inputs.readers) + len(fisher_readers), grams_of, choice)
            budget = max(costs, default=0)  # the largest tensor alone, or several smaller ones together
            with ShardedWriter(tmp, plan, shard_size, metadata, shards) as writer:
                merged_in_order = _ordered_map(merge_one, [n for n, _, _ in plan], costs, budget, workers)
                _write_in_order(writer, plan, merged_in_order, progress)
            side_tok = src_tok if vocab is None else None  # a built vocabulary writes its own tokenizer
            copy_side_files(layout.path if layout_from is not None else ref_path, side_tok, tmp, out_dtype)
            if vocab is not None:
                vocab.write(tmp)
            _chat_template(recipe, [ref_path, *(r.path for r in inputs.readers)], tmp)
            (tmp / "robustft_merge.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
            for fname, text in (info_files or {}).items():
                (tmp / fname).write_text(text)
            files = list(writer.files)
    return MergeResult(Path(out_dir), len(plan), files, time.perf_counter() - start)


#: a transformer block's tensor: prefix, layer index, rest ("model.layers.3.mlp.up_proj.weight")
_LAYER = re.compile(r"^(.*\blayers\.)(\d+)(\..+)$")
#: block names of other layouts (GPT-2's ``h.3.``, BERT's ``layer.3.``, ``blocks.3.``)
_OTHER_BLOCKS = re.compile(r"(^|\.)(h|layer|blocks?)\.\d+\.")


def _local_paths(recipe: Recipe) -> dict[str, Path]:
    """Each model reference of the recipe -> its local folder (a Hub id through the hub cache)."""
    refs = [recipe.base_model, *(m.path for m in recipe.models)]
    refs += [s.path for piece in recipe.slices for s in piece.sources]
    refs += [piece.base_model for piece in recipe.slices]
    source = recipe.tokenizer_source
    if source not in (None, "base", "union") and not Path(source).is_dir():
        refs.append(source)
    return {ref: resolve_model(ref) for ref in dict.fromkeys(r for r in refs if r is not None)}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, compute: torch.dtype) -> torch.Tensor:
    """An input tensor in the compute dtype, first rounded to the recipe's ``dtype`` where that is narrower
    than the stored one (mergekit casts every input to ``dtype`` before merging)."""
    if (
        dtype is not None
        and dtype != tensor.dtype
        and torch.finfo(dtype).bits < torch.finfo(tensor.dtype).bits
    ):
        tensor = tensor.to(dtype)
    return tensor.to(compute)


def _chat_template(recipe: Recipe, inputs: list[Path], out: Path) -> None:
    """mergekit's ``chat_template`` (a name, ``auto`` or a Jinja string), written beside the tokenizer."""
    if recipe.chat_template is not None:
        write_chat_template(recipe.chat_template, inputs, out)


def _layer_of(name: str) -> tuple[str, int, str] | None:
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _num_layers(reader: CheckpointReader, who: str) -> int:
    """``num_hidden_layers`` of a checkpoint's config.json (mergekit's layer count)."""
    config = reader.folder / "config.json"
    value = json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None
    if not isinstance(value, int):
        raise ValueError(f"{who} has no config.json with num_hidden_layers (needed to spread gradients)")
    return value


def layer_position(index: int, count: int) -> float:
    """mergekit's position of a slice's layer ``index`` among ``count`` for gradients: index/(count-1), 1 for
    a one-layer slice; tensors outside the blocks (embeddings, final norm, head) get 0."""
    return index / (count - 1) if count > 1 else 1.0


def _tensor_parameters(
    recipe: Recipe,
    ref: CheckpointReader,
    names: list[str],
    choice: dict[str, int | None],
    resolved: dict[int | None, tuple[str, dict, list[dict]]],
) -> dict[str, tuple[str, dict, list[dict]]]:
    """(method, method-wide, per-model parameters) of every tensor: the rule's when nothing depends on the
    tensor, else each tensor's own (gradients over the layers, filters on the name), every one checked."""
    if not recipe.dynamic:
        return {name: resolved[choice[name]] for name in names}
    for method, _, _ in resolved.values():
        if method in ("fisher", "regmean"):
            key = "fisher" if method == "fisher" else "gram"
            if any(is_dynamic(m.parameters.get(key)) for m in recipe.models):
                raise ValueError(
                    f"models[].parameters.{key}: a gradient or filter list of files is not supported"
                )
    layered = {n: _layer_of(n) for n in names}
    prefixes = {p[0] for p in layered.values() if p is not None}
    other = [n for n in names if layered[n] is None and _OTHER_BLOCKS.search(n)]
    if recipe.has_gradients and (other or not prefixes):
        raise ValueError(
            f"gradients: {ref.path} does not name its blocks '<prefix>.layers.<i>.' "
            f"({'e.g. ' + repr(other[0]) if other else 'no such tensor'}): the layer positions of a gradient "
            "are known for Llama-family layouts only"
        )
    count = None
    out = {}
    labels = [f"models[{i}] ({m.path})" for i, m in enumerate(recipe.models)]
    for name in names:
        t = 0.0
        pos = layered[name]
        if pos is not None:
            if count is None:
                if len(prefixes) > 1:
                    raise ValueError(
                        f"gradients: {ref.path} has several stacks of layers "
                        f"({', '.join(sorted(prefixes))}); "
                        "spreading a gradient over them is not supported"
                    )
                count = _num_layers(ref, str(ref.path))
            if pos[1] >= count:
                raise ValueError(f"tensor {name!r}: layer {pos[1]} beyond num_hidden_layers {count}")
            t = layer_position(pos[1], count)
        rule = choice[name]
        override = None if rule is None else recipe.overrides[rule]
        method, gparams, mparams = recipe.resolve(override, name=name, t=t)
        if ref.infos[name].dtype.is_floating_point:
            has_base = recipe.base_model is not None
            check_resolved(f"tensor {name!r}", method, gparams, mparams, has_base, labels, interpolated=True)
        out[name] = (method, gparams, mparams)
    return out


@dataclass(frozen=True)
class _Job:
    """One output tensor of a slices merge: its inputs (model path, input name), base first when used."""

    name: str
    base: tuple[Path, str] | None
    inputs: tuple[tuple[Path, str], ...]
    params: tuple[str, dict, list[dict]]
    labels: tuple[str, ...]
    piece: int = 0


def _merge_slices(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    overwrite: bool,
    max_shard_size: int | str | None,
    progress: bool,
    workers: int,
    start: float,
) -> MergeResult:
    """mergekit's ``slices:`` with any method: each slice merges its sources layer by layer (a gradient spread
    over the slice's layers, ``layer_position``), the output's blocks are the slices' layers renumbered from
    0, the embeddings ("embed" in the name) are merged from the first slice's sources and the other
    non-layer tensors (final norm, head) from the last slice's, at position 0, as mergekit plans
    Llama-family models. The config is the reference model's (base_model, else the first source) with
    ``num_hidden_layers`` (and ``layer_types``) for the stack; every output tensor must have the shape the
    reference model gives it (no stacking of layers of another width)."""
    local = _local_paths(recipe)
    paths = list(dict.fromkeys(local[s.path] for piece in recipe.slices for s in piece.sources))
    ref_path = local[recipe.reference_model]
    tok_ref = recipe.reference_model if recipe.tokenizer_source == "base" else recipe.tokenizer_source
    tok = local.get(tok_ref, tok_ref) if tok_ref is not None else None
    inputs = [*paths, ref_path, tok]
    inputs += recipe.tokenizer.paths() if recipe.tokenizer is not None else []
    check_output_dir(out_dir, overwrite, inputs)
    with ExitStack() as stack:
        readers = {p: stack.enter_context(CheckpointReader(p)) for p in dict.fromkeys([ref_path, *paths])}
        readers = _tie_slice_heads(recipe, local, readers, ref_path)
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
                    "slices support those only"
                )
        jobs, layer_types, total = _slice_jobs(recipe, local, readers, configs)
        ref = readers[ref_path]
        vocab, groups = _slice_vocabulary(recipe, local, readers, jobs, ref_path)
        _check_job_shapes(jobs, readers, ref, vocab.tensors if vocab is not None else frozenset())
        out_dtype = recipe.out_dtype or recipe.dtype
        plan = []
        for job in jobs:
            path, src = job.base or job.inputs[0]
            info = readers[path].infos[src]
            floating = info.dtype.is_floating_point
            shape = info.shape if vocab is None else vocab.shape(job.name, info.shape)
            plan.append((job.name, shape, out_dtype if out_dtype is not None and floating else info.dtype))
        shard_size = max_shard_size or recipe.max_shard_size or "5GB"

        def merge_one(job: _Job) -> torch.Tensor:
            method, gparams, mparams = job.params
            first = job.base or job.inputs[0]
            dtype = readers[first[0]].infos[first[1]].dtype
            if not dtype.is_floating_point:
                keys = [*([job.base] if job.base else []), *job.inputs]
                return kept_tensor(job.name, [readers[p].get(n) for p, n in keys], job.labels)
            compute = compute_dtype(dtype)
            group = groups.get(job.name)
            read = _rows_reader(group, job.name, readers, compute) if group else (lambda r, n: r.get(n))
            base = _cast(read(readers[job.base[0]], job.base[1]), recipe.dtype, compute) if job.base else None
            if method == "base":
                return base
            tensors = [_cast(read(readers[p], n), recipe.dtype, compute) for p, n in job.inputs]
            try:
                return merge_tensor(
                    method, base, tensors, gparams, mparams, tensor_seed(recipe.seed, job.name)
                )
            except ValueError as err:
                raise ValueError(f"tensor {job.name!r} ({method}): {err}") from err

        n_inputs = 1 + max((len(j.inputs) for j in jobs), default=0)
        costs = [(n_inputs + 1) * math.prod(shape) for _, shape, _ in plan]
        budget = max(costs, default=0)
        with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
            with ShardedWriter(tmp, plan, shard_size, {"merged_by": "robustft"}) as writer:
                _write_in_order(writer, plan, _ordered_map(merge_one, jobs, costs, budget, workers), progress)
            copy_side_files(ref_path, tok if vocab is None else None, tmp, out_dtype)
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["num_hidden_layers"] = total
            if "layer_types" in config:
                config["layer_types"] = layer_types
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if vocab is not None:
                vocab.write(tmp)
            _chat_template(recipe, list(readers), tmp)
            (tmp / "robustft_merge.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
            files = list(writer.files)
    return MergeResult(Path(out_dir), len(plan), files, time.perf_counter() - start)


def _tie_slice_heads(
    recipe: Recipe, local: dict[str, Path], readers: dict[Path, CheckpointReader], ref_path: Path
) -> dict[Path, CheckpointReader]:
    """The slices' readers with tied models' heads read as mergekit reads them: the head (post weights) is
    gathered from the last slice's sources (as many as the first slice has), written when one of them has
    an untied head, the tied ones giving their input embedding. A reference (config) with a head of its own
    and a last slice of tied models only is refused: mergekit writes no head there, and the output config
    then wants one that transformers initialises at random."""
    first, last = recipe.slices[0], recipe.slices[-1]
    post = list(dict.fromkeys(local[s.path] for s in last.sources[: len(first.sources)]))
    views, out = tie_missing_heads(list(readers.values()), [readers[p] for p in post])
    if out is not None and out in readers[ref_path].infos and not any(out in readers[p].infos for p in post):
        raise ValueError(
            f"slices[{len(recipe.slices) - 1}]: every source of the last slice ties its embeddings (no "
            f"{out!r}) but the output's config is {ref_path}'s, which has its own {out!r}: mergekit 0.1.5 "
            "then writes no head and the model loads with a random one; robustft refuses. Take base_model "
            "from a tied model, or end with a slice of a model that has the head"
        )
    return dict(zip(readers, views, strict=True))


def _slice_vocabulary(
    recipe: Recipe, local: dict[str, Path], readers: dict[Path, CheckpointReader], jobs: list[_Job], ref: Path
) -> tuple[Any, dict[str, Any]]:
    """mergekit's output vocabulary for a slices recipe (None without ``tokenizer_source``/``tokenizer``):
    built from every referenced model (the base model's tokenizer, else the first source's), and per
    embedding-like output tensor the plan of the sources it is gathered from (the first slice's for the
    embeddings, the last slice's for the head), filled from those only, with that slice's base model."""
    if recipe.tokenizer is None:
        return None, {}
    from robustft.merge.tokenizer import build_vocabulary

    by_path = {str(p): r for p, r in readers.items()}
    base = str(ref) if recipe.base_model is not None else None
    vocab = build_vocabulary(recipe.tokenizer, base, list(by_path), by_path, check=False)
    groups, cache = {}, {}
    for job in jobs:
        if job.name not in vocab.tensors:
            continue
        piece = recipe.slices[job.piece]
        order = [str(local[s.path]) for s in piece.sources]
        used = {str(p) for p, _ in [*([job.base] if job.base else []), *job.inputs]}
        models = [m for m in dict.fromkeys(order) if m in used]
        slice_base = piece.base_model or recipe.base_model
        slice_base = None if slice_base is None else str(local[slice_base])
        key = (tuple(models), slice_base)
        if key not in cache:
            cache[key] = vocab.group(models, slice_base, by_path)
        groups[job.name] = cache[key]
    return vocab, groups


def _rows_reader(
    plan: Any, name: str, readers: dict[Path, CheckpointReader], dtype: torch.dtype
) -> Callable[[CheckpointReader, str], torch.Tensor]:
    """(reader, input name) -> the reader's tensor ``name`` in the output vocabulary's rows (``plan``)."""
    read = plan.reads(name, {str(p): r for p, r in readers.items() if plan.key(p) in plan.rows}, dtype)
    return lambda reader, _name: read(reader)


def _slice_jobs(
    recipe: Recipe, local: dict[str, Path], readers: dict[Path, CheckpointReader], configs: dict[Path, dict]
) -> tuple[list[_Job], list, int]:
    """The output tensors of a slices merge in mergekit's order (embeddings, blocks, the rest), each with its
    inputs and its resolved parameters; also the stack's ``layer_types`` and number of layers."""
    jobs: list[_Job] = []

    def job(name: str, piece: OutputSlice, index: int, t: float, names: dict[LayerSlice, str]) -> _Job:
        rule = _override_for(name, recipe.overrides)
        override = None if rule is None else recipe.overrides[rule]
        method = (
            override.merge_method if override and override.merge_method else None
        ) or recipe.merge_method
        base, models = recipe.slice_roles(piece, method)
        own = [(s.parameters, names[s]) for s in models]
        params = recipe.resolve(override, name=name, t=t, piece=piece, own=own)
        labels = [f"slices[{index}] source {s.path}" for s in models]
        first = names[(base or models[0])]
        if readers[local[(base or models[0]).path]].infos.get(first, None) is not None and (
            readers[local[(base or models[0]).path]].infos[first].dtype.is_floating_point
        ):
            where = f"tensor {name!r} (slices[{index}])"
            check_resolved(where, *params, base is not None, labels, interpolated=recipe.dynamic)
        return _Job(
            name,
            None if base is None else (local[base.path], names[base]),
            tuple((local[s.path], names[s]) for s in models),
            params,
            tuple(([f"slices[{index}] base {base.path}"] if base else []) + labels),
            index,
        )

    def missing(path: Path, name: str, where: str) -> None:
        if name not in readers[path].infos:
            raise ValueError(f"{where}: {path} has no tensor {name!r}")

    first, last = recipe.slices[0], recipe.slices[-1]
    first_names = readers[local[first.sources[0].path]].names
    for name in first_names:
        if not _LAYER.match(name) and "embed" in name:
            for s in first.sources:
                missing(local[s.path], name, "slices[0].sources")
            jobs.append(job(name, first, 0, 0.0, {s: name for s in first.sources}))
    out_layer = 0
    layer_types: list = []
    for k, piece in enumerate(recipe.slices):
        for j, s in enumerate(piece.sources):
            total = configs[local[s.path]]["num_hidden_layers"]
            if s.end > total:
                raise ValueError(
                    f"slices[{k}].sources[{j}].layer_range: [{s.start}, {s.end}] goes beyond the "
                    f"{total} layers of {s.path}"
                )
        lead = piece.sources[0]
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for n in readers[local[lead.path]].names:
            pos = _layer_of(n)
            if pos is not None:
                by_layer.setdefault(pos[1], []).append((pos[0], pos[2]))
        for idx in range(piece.length):
            t = layer_position(idx, piece.length)
            for prefix, rest in by_layer.get(lead.start + idx, []):
                names = {s: f"{prefix}{s.start + idx}{rest}" for s in piece.sources}
                for s in piece.sources:
                    missing(local[s.path], names[s], f"slices[{k}].sources")
                jobs.append(job(f"{prefix}{out_layer}{rest}", piece, k, t, names))
            out_layer += 1
        types = configs[local[lead.path]].get("layer_types")
        if isinstance(types, list):
            layer_types += types[lead.start : lead.end]
    # mergekit pairs the last slice's sources with as many input weights as the first slice has sources
    last = OutputSlice(last.sources[: len(first.sources)], last.base_model, last.parameters)
    for name in readers[local[last.sources[0].path]].names:
        if not _LAYER.match(name) and "embed" not in name:
            for s in last.sources:
                missing(local[s.path], name, f"slices[{len(recipe.slices) - 1}].sources")
            jobs.append(job(name, last, len(recipe.slices) - 1, 0.0, {s: name for s in last.sources}))
    return jobs, layer_types, out_layer


def _check_job_shapes(
    jobs: list[_Job], readers: dict[Path, CheckpointReader], ref: CheckpointReader, free_rows: frozenset[str]
) -> None:
    """Every input of an output tensor has the same shape, and that shape is the one the reference model
    (whose config the output gets) has for that tensor: layers of another width are refused by name. The
    tensors of ``free_rows`` (mapped onto an output vocabulary) may differ in their number of rows."""
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for n, info in ref.infos.items():
        pos = _layer_of(n)
        shapes.setdefault(n if pos is None else f"{pos[0]}*{pos[2]}", set()).add(info.shape)
    for job in jobs:
        keys = [*([job.base] if job.base else []), *job.inputs]
        first = readers[keys[0][0]].infos[keys[0][1]]
        for (path, name), label in zip(keys[1:], job.labels[1:], strict=True):
            other = readers[path].infos[name]
            rows_only = job.name in free_rows and other.shape[1:] == first.shape[1:]
            if other.shape != first.shape and not rows_only:
                raise ValueError(
                    f"tensor {job.name!r}: {name!r} of {label} has shape {tuple(other.shape)}, "
                    f"{keys[0][1]!r} of {job.labels[0]} has {tuple(first.shape)}"
                )
        pos = _layer_of(job.name)
        key = job.name if pos is None else f"{pos[0]}*{pos[2]}"
        expected = shapes.get(key)
        if job.name in free_rows and expected is not None:
            expected = {(first.shape[0], *e[1:]) for e in expected}
        if expected is None or first.shape not in expected:
            want = "no such tensor" if expected is None else " or ".join(str(s) for s in sorted(expected))
            raise ValueError(
                f"tensor {job.name!r}: shape {tuple(first.shape)} (from {job.labels[0]}) does not fit the "
                f"output's config, which is {ref.path}'s ({want}): stacking layers of different widths "
                "is not supported"
            )
