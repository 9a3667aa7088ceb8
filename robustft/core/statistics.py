"""Statistics of a model on data, for merges that weigh each model by what its data constrains: the diagonal
Fisher information (``fisher`` method) and the Gram matrices of the linear layers' inputs (``regmean``).

Lives outside ``ops/`` because it runs the model. Both are saved as safetensors whose tensor names are the
checkpoint's parameter names (``save_fisher``, ``save_gram``), so a recipe can point at them; the merge
engine reads a Gram file through ``robustft.merge.io.GramFile``, one tensor at a time. Training uses the
estimates too (``SparseUpdateCallback``'s Fisher scores), so this sits in ``core/``, below merge/ and
callbacks/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from robustft.core import distributed
from robustft.core.checkpoint import GRAM_KIND, atomic_output_file
from robustft.core.params import select_parameters, train_mode
from robustft.ops.outputs import model_loss

__all__ = ["GRAM_KIND", "Grams", "estimate_fisher", "estimate_gram", "save_fisher", "save_gram"]


def _batch_size(batch: Mapping[str, torch.Tensor], who: str) -> int:
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"{who}: batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _rows(batch: Mapping[str, torch.Tensor], start: int, stop: int, device: torch.device) -> dict:
    return {
        k: ((v[start:stop] if v.dim() > 0 else v).to(device) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }


def _model_inputs(
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
    max_examples: int | None,
    single: bool,
    who: str,
) -> Iterator[dict[str, torch.Tensor]]:
    """The dataloader's batches on ``device`` (split into single examples if ``single``), cut after
    ``max_examples`` examples in all; raises if it yields none."""
    n = 0
    for batch in dataloader:
        size = _batch_size(batch, who)
        step = 1 if single else size
        for start in range(0, size, step):
            stop = min(start + step, size)
            if max_examples is not None:
                stop = min(stop, start + max_examples - n)
            yield _rows(batch, start, stop, device)
            n += stop - start
            if max_examples is not None and n >= max_examples:
                return
    if n == 0:
        raise ValueError(f"{who}: the dataloader yielded no examples")


def _save(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, overwrite: bool, metadata: dict[str, str]
) -> Path:
    """Write name -> tensor to ``path`` as safetensors, atomically; no overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    with atomic_output_file(path) as tmp:
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(data, str(tmp), metadata={"format": "pt", **metadata})
    return path


def _default_loss(model: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return model_loss(model(**example))
    except ValueError as err:
        raise ValueError(f"estimate_fisher: {err}") from None


PER_EXAMPLE = ("auto", "vmap", "loop")
AUTO_VMAP_ON_CPU = False  # "auto" takes vmap on CPU too (measured no faster there: docs/benchmarks.md#fisher)
_VMAP_BYTES = 2**30  # per-example gradients held at once by one vmap call (float32)


class _LossOf(nn.Module):
    """``loss_fn(model, example)`` as a module, so ``functional_call`` can swap the weights under it."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, example: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, example)


def _groups(batch: Mapping[str, torch.Tensor], size: int, cap: int) -> list[torch.Tensor]:
    """Row indices of ``batch`` grouped by equal ``attention_mask`` rows (one group without a mask), each cut
    to at most ``cap`` rows: inside a group the mask is one tensor, not a vmapped one, so models that look at
    its values (transformers' ``padding_mask.all()``) still run under vmap."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() > 0:
        _, inverse = torch.unique(mask.reshape(size, -1), dim=0, return_inverse=True)
        groups = [torch.nonzero(inverse == g).flatten() for g in range(int(inverse.max()) + 1)]
    else:
        groups = [torch.arange(size)]
    return [idx[i : i + cap] for idx in groups for i in range(0, len(idx), cap)]


def _split(rows: Mapping[str, object]) -> tuple[dict, dict]:
    """(keys vmapped over, keys passed once): a tensor whose rows are all equal goes once, as one row."""
    batched, shared = {}, {}
    for k, v in rows.items():
        if torch.is_tensor(v) and v.dim() > 0 and not bool((v == v[:1]).all()):
            batched[k] = v
        else:
            shared[k] = v[:1] if torch.is_tensor(v) and v.dim() > 0 else v
    return batched, shared


def _vmap_square_sums(
    module: nn.Module, weights: dict[str, torch.Tensor], rows: Mapping[str, object]
) -> list[torch.Tensor]:
    """sum over the rows of (d loss_row / d w)^2 for each weight, from one ``vmap(grad(...))`` call."""
    from torch.func import functional_call, grad, vmap

    batched, shared = _split(rows)

    def loss(w: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> torch.Tensor:
        example = {**shared, **{k: v.unsqueeze(0) for k, v in one.items()}}
        return functional_call(module, w, args=(example,))

    if batched:
        grads = vmap(grad(loss), in_dims=(None, 0), randomness="error")(weights, batched)
        return [g.float().pow(2).sum(0) for g in grads.values()]
    grads = grad(loss)(weights, {})  # every row the same example: n times its square
    n = _batch_size({k: v for k, v in rows.items() if torch.is_tensor(v)}, "estimate_fisher")
    return [g.float().pow(2) * n for g in grads.values()]


def _loop_square_sums(
    model: nn.Module, loss_fn: Callable, tensors: list[torch.Tensor], rows: Mapping[str, object]
) -> list[torch.Tensor]:
    """sum over the rows of (d loss_row / d w)^2, one forward and backward per row."""
    sums = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
    for example in _model_inputs([rows], tensors[0].device, None, True, "estimate_fisher"):
        grads = torch.autograd.grad(loss_fn(model, example), tensors, allow_unused=True)
        for s, g in zip(sums, grads, strict=True):
            if g is not None:
                g = g.detach().float()
                s.addcmul_(g, g)  # in place: no squared copy of every gradient
    return sums


def _vmap_refused(err: RuntimeError) -> bool:
    """True for torch.func's refusals (data-dependent control flow, ``.item()``, random ops, in-place
    writes into a non-batched tensor, missing batching rules), which the loop runs fine."""
    return "vmap" in str(err) or "functorch" in str(err) or "batched tensor" in str(err).lower()


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    max_examples: int | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    across_ranks: bool = False,
    per_example: str = "auto",
) -> dict[str, torch.Tensor]:
    """F_j = (1/N) sum_n (d loss_n / d theta_j)^2: the empirical diagonal Fisher over N single examples.

    With the default loss (the model's own ``loss``, i.e. the negative log-likelihood of the labels in the
    batch) this is the empirical Fisher of Fisher-weighted averaging (Matena & Raffel, 2022). Each example is
    its own batch of one (its row of the dataloader's batch, padding included), because the square of a
    batch gradient is not the mean of the squares. The model runs in eval mode (restored afterwards) and its
    ``.grad`` fields are not touched. Returns float32 CPU tensors keyed by parameter name (trainable
    parameters, filtered by include/exclude).

    ``per_example``: how the per-example gradients are taken, the same numbers to float rounding.
    ``"vmap"``: ``torch.func.vmap(grad(...))`` over the rows of each batch (grouped by equal
    ``attention_mask`` rows, at most 1 GiB of float32 gradients per call); raises where torch.func refuses
    the model. ``"loop"``: one forward and backward per example. ``"auto"`` (default): the loop on CPU,
    where vmap was measured no faster (docs/benchmarks.md#fisher); on an accelerator vmap, and the loop
    from the first batch that vmap refuses (data-dependent control flow, ``.item()``, random ops such as a
    loss that samples labels, in-place writes).

    ``across_ranks=True`` (a collective: every rank must call it): the sums and N are added over the ranks
    of a distributed run, so every rank gets the Fisher of all the ranks' examples together (each rank's
    ``max_examples`` caps its own share): the whole set's Fisher when each rank reads its own share, the
    same Fisher as one process when every rank reads the same data.
    """
    if per_example not in PER_EXAMPLE:
        raise ValueError(f"estimate_fisher: per_example must be one of {PER_EXAMPLE}, got {per_example!r}")
    params = select_parameters(model, include=include, exclude=exclude)
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    fisher = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in tensors]
    loss_fn = loss_fn or _default_loss
    module = _LossOf(model, loss_fn)
    weights = {f"model.{name}": t.detach() for name, t in params.items()}
    cap = max(1, _VMAP_BYTES // (4 * sum(t.numel() for t in tensors)))
    vmapping = per_example == "vmap" or (per_example == "auto" and (AUTO_VMAP_ON_CPU or device.type != "cpu"))
    n = 0
    with train_mode(model, False):
        for batch in _model_inputs(dataloader, device, max_examples, False, "estimate_fisher"):
            size = _batch_size(batch, "estimate_fisher")
            for idx in _groups(batch, size, cap) if vmapping else [torch.arange(size)]:
                rows = {k: (v[idx.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in batch.items()}
                sums = None
                if vmapping:
                    try:
                        sums = _vmap_square_sums(module, weights, rows)
                    except RuntimeError as err:
                        if not _vmap_refused(err):
                            raise
                        if per_example == "vmap":
                            raise ValueError(
                                f"estimate_fisher: per_example='vmap' but torch.func cannot run this model "
                                f"({err}); use per_example='auto' or 'loop'"
                            ) from err
                        vmapping = False
                if sums is None:
                    sums = _loop_square_sums(model, loss_fn, tensors, rows)
                for f, s in zip(fisher, sums, strict=True):
                    f.add_(s)
                n += len(idx)
    if across_ranks:
        for f in fisher:
            distributed.all_reduce_sum(f)
        n = int(distributed.all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=device)).item())
    return {name: (f / n).cpu() for name, f in zip(names, fisher, strict=True)}


def save_fisher(fisher: Mapping[str, torch.Tensor], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Fisher (name -> tensor) to ``path`` as safetensors, atomically; no overwrite unless asked."""
    return _save(fisher, path, overwrite, {})




@dataclass
class Grams:
    """Input Gram matrices of a model's linear layers, keyed by the layer's *weight* name (as saved).

    ``matrices[name]`` = G = sum over input rows x of x x^T (in x in, float32, CPU); ``counts[name]`` the
    number of rows summed; ``input_axis[name]`` the weight's input axis: 1 for ``nn.Linear`` (out, in),
    0 for transformers' GPT-2 ``Conv1D``, which stores its weight as (in, out).
    """

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    input_axis: dict[str, int] = field(default_factory=dict)


def _linear_layers(model: nn.Module, names: Mapping[int, str]) -> list[tuple[nn.Module, str, int]]:
    """(module, weight name, input axis) of each ``nn.Linear`` / GPT-2 ``Conv1D`` whose weight is selected."""
    from transformers.pytorch_utils import Conv1D

    layers = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) in names:
            layers.append((module, names[id(module.weight)], 0 if isinstance(module, Conv1D) else 1))
    return layers


def estimate_gram(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    max_examples: int | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> Grams:
    """G = sum_x x x^T over the inputs x of every selected linear layer, for RegMean (``regmean`` method).

    Forward hooks on each ``nn.Linear`` and GPT-2 ``Conv1D`` whose weight is selected (``include``/
    ``exclude``: regular expressions searched in the weight's name, frozen weights included) record the
    float32 Gram of the layer's input rows (every leading axis flattened) and their count. Where the batch
    has a 2-D ``attention_mask`` and a layer's input starts with the mask's (batch, sequence) shape, the
    rows of padding tokens (mask 0) are left out. A weight shared by several layers gets the sum of their
    Grams; a layer the data never reaches gets none. At most ``max_examples`` examples (rows of the batch),
    in eval mode and without gradients; hooks removed and the mode restored also when the model raises.
    """
    params = select_parameters(model, include=include, exclude=exclude, trainable_only=False)
    layers = _linear_layers(model, {id(t): name for name, t in params.items()})
    if not layers:
        raise ValueError(
            "estimate_gram: no nn.Linear or Conv1D weight selected "
            f"(include={include!r}, exclude={exclude!r})"
        )
    grams = Grams()  # each Gram on its layer's device while it is estimated
    for module, name, axis in layers:
        n_in = module.weight.shape[axis]
        zeros = torch.zeros(n_in, n_in, dtype=torch.float32, device=module.weight.device)
        grams.matrices.setdefault(name, zeros)
        grams.counts[name] = 0
        grams.input_axis[name] = axis
    batch_mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            mask = batch_mask[0]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                rows = rows[mask.reshape(-1).to(rows.device) != 0]
            gram = grams.matrices[name]
            rows = rows.to(gram.device)
            gram.addmm_(rows.T, rows)
            grams.counts[name] += rows.shape[0]

        return record

    handles = []
    try:
        for module, name, _ in layers:
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        with train_mode(model, False), torch.no_grad():
            device = next(model.parameters()).device  # the inputs' device, as the model takes them
            for batch in _model_inputs(dataloader, device, max_examples, False, "estimate_gram"):
                mask = batch.get("attention_mask")
                batch_mask[0] = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    # a layer the data never reached has no Gram (the merge then averages it, as FusionBench)
    reached = [name for name, n in grams.counts.items() if n > 0]
    return Grams(
        {k: grams.matrices[k].cpu() for k in reached},
        {k: grams.counts[k] for k in reached},
        {k: grams.input_axis[k] for k in reached},
    )


def save_gram(grams: Grams, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write Gram matrices (keyed by weight name) with their row counts and input axes to ``path`` as
    safetensors, atomically; no overwrite unless asked. A recipe's ``gram:`` points at the file."""
    metadata = {
        "kind": GRAM_KIND,
        "counts": json.dumps(grams.counts, sort_keys=True),
        "input_axis": json.dumps(grams.input_axis, sort_keys=True),
    }
    return _save(grams.matrices, path, overwrite, metadata)
