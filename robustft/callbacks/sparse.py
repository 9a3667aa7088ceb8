"""Sparse updates as a Trainer callback: only a fixed subset of the weights moves, the rest stays bit-exact.

* :class:`FrozenEntries` - the one mechanism that keeps entries of parameters still while the Trainer's own
  optimizer runs (used here and by LP-FT's probe phase, ``robustft.callbacks.lpft``).
* :class:`SparseUpdateCallback` - FISH masks (Fisher top-k), the magnitude variant, any score, or a saved
  mask file; :func:`save_mask` / :func:`load_mask` write and read masks (safetensors, bool per parameter).

Why masking the gradient is not enough: AdamW's decoupled weight decay (θ ← θ − lr·λ·θ) and SGD's coupled
decay move an entry whose gradient is 0, and an optimizer state built before the mask would keep moving
it. :class:`FrozenEntries` therefore (1) masks the gradient after every micro-batch's backward, before
clipping and before the step, so the clipping norm, the other callbacks and the optimizer's moments see
exactly 0 there, (2) drops the gradient of wholly frozen tensors, so the optimizer skips them (no decay, no
state), and (3) wraps ``optimizer.step`` and writes every frozen entry's pre-step value back right after it
(``ops.sparse.keep_masked_``): bit-identical whatever the optimizer does, and whatever the order of the
callback list (a one-pass perturbation is undone before the step, so the values saved are the unperturbed
ones). No hook is put on the model: the wrappers are the callback's, scoped to the training run
(``RobustCallback.wrap_method``), so a ``train()`` that raises leaves the model training like a fresh copy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from robustft.callbacks.base import RobustCallback
from robustft.checks import check_count, check_density, compile_patterns, short_repr
from robustft.core import distributed
from robustft.core.checkpoint import atomic_output_file
from robustft.core.compat import clip_grad_norm_name
from robustft.core.params import is_sharded, select_parameters
from robustft.core.statistics import estimate_fisher
from robustft.ops.sparse import keep_masked_, magnitude_scores, mask_gradient, top_k_masks

__all__ = ["FrozenEntries", "SparseUpdateCallback", "load_mask", "save_mask"]

_SCORES = ("fisher", "magnitude")


def refuse_unsupported(owner: str, trainer: Any, params: Mapping[str, torch.Tensor]) -> None:
    """Refuse set-ups where ``optimizer.step`` is not where the weights change (DeepSpeed steps inside its
    backward) or where a rank holds only a shard (FSDP2/ZeRO-3: a global top-k needs the whole tensor)."""
    if distributed.deepspeed_stage(trainer if trainer is not None else params) is not None:
        raise ValueError(f"{owner} does not support DeepSpeed: its engine steps inside the backward, out of "
                         "reach of the frozen-entry restore; use DDP")
    if is_sharded(params):
        raise ValueError(f"{owner} does not support sharded parameters (FSDP2, ZeRO-3); use DDP")


class FrozenEntries:
    """Entries of parameters that must not move (mask False), kept bit-identical through every optimizer step.

    ``masks``: name -> bool tensor of the parameter's shape, or a 0-d ``False`` to freeze the whole tensor
    (no parameter-sized mask). See the module docstring for the three guarantees. Nothing is attached to
    the model: the gradients are masked by wrappers of the Trainer's ``training_step`` and
    ``_clip_grad_norm`` and of ``optimizer.step``, which last as long as the training run
    (:meth:`RobustCallback.wrap_method`), also when ``train()`` raises.
    """

    def __init__(
        self, owner: RobustCallback, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ):
        self.owner = owner
        self.items = [(params[n], masks[n].to(params[n].device)) for n in masks if not bool(masks[n].all())]
        self._optimizer = None
        self._trainer_methods: list[str] = []

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Frozen entries' gradients to exactly 0 (NaN/Inf included), a wholly frozen tensor's to None (so
        the optimizer skips it: no decay, no state). Idempotent; exact like masking each micro-batch's."""
        for p, m in self.items:
            if p.grad is None:
                continue
            if m.dim() == 0:
                p.grad = None
            else:
                p.grad.copy_(mask_gradient(p.grad, m))

    def start(self, optimizer) -> None:
        """Mask the gradients after every micro-batch, before clipping and before ``optimizer.step``, and
        restore the frozen entries right after the step."""
        if optimizer is None:
            raise ValueError(f"{type(self.owner).__name__}: the Trainer passed no optimizer to the callback")
        items, current = self.items, optimizer.step

        def make_wrapper(original):
            def step(*args, **kwargs):
                self.mask_gradients()  # also a gradient put there after the last micro-batch (exact SAM)
                before = [p.detach().clone() for p, _ in items]
                try:
                    return original(*args, **kwargs)
                finally:
                    for (p, m), b in zip(items, before, strict=True):
                        keep_masked_(p.detach(), b, m)

            # carry the marks of the step we wrap (the LR scheduler's check that step() is its own)
            return functools.update_wrapper(step, current)

        def masking_after(original):
            def call(*args, **kwargs):
                try:
                    return original(*args, **kwargs)
                finally:
                    self.mask_gradients()

            return call

        def masking_before(original):
            def call(*args, **kwargs):
                self.mask_gradients()
                return original(*args, **kwargs)

            return call

        self._optimizer = optimizer
        self.owner.wrap_method("step", make_wrapper, target=optimizer)
        trainer = self.owner.trainer
        if trainer is not None:
            self._trainer_methods = ["training_step", clip_grad_norm_name(trainer)]
            self.owner.wrap_method("training_step", masking_after)
            self.owner.wrap_method(self._trainer_methods[1], masking_before)

    def stop(self) -> None:
        """Remove the wrappers: every entry trains from now on."""
        for name in self._trainer_methods:
            self.owner.unwrap_method(name)
        self._trainer_methods = []
        if self._optimizer is not None:
            self.owner.unwrap_method("step", target=self._optimizer)
            self._optimizer = None


# -- mask files --------------------------------------------------------------------------------------
def save_mask(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write masks (name -> bool tensor) to ``path`` as safetensors, atomically; no overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_mask: {path} already exists; pass overwrite=True to replace it")
    with atomic_output_file(path) as tmp:
        save_file({n: m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}, str(tmp),
                  metadata={"format": "pt", "robustft": "sparse_mask"})
    return path


def load_mask(
    path: str | os.PathLike, params: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Read masks from ``path``; with ``params``, every selected parameter must have a mask of its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask_file: {path} not found")
    masks = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            m = f.get_tensor(name)
            if m.dtype != torch.bool and not ((m == 0) | (m == 1)).all():
                raise ValueError(f"mask_file: {path}: tensor {name!r} is not a 0/1 mask (dtype {m.dtype})")
            masks[name] = m.bool()
    if params is not None:
        missing = sorted(set(params) - set(masks))
        extra = sorted(set(masks) - set(params))
        if missing or extra:
            raise ValueError(
                f"mask_file: {path} does not match the selected parameters: no mask for "
                f"{short_repr(missing)}, masks of unselected/unknown tensors {short_repr(extra)}"
            )
        for name, p in params.items():
            if tuple(masks[name].shape) != tuple(p.shape):
                raise ValueError(f"mask_file: {path}: mask {name!r} has shape {tuple(masks[name].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
        masks = {n: masks[n] for n in params}
    return masks


class SparseUpdateCallback(RobustCallback):
    """Train only a fixed sparse subset of the weights; every other entry ends bit-identical to the start.

    The mask keeps the k = density·N entries (over all selected parameters together) of largest score:

    - ``scores="fisher"``: FISH masks (Sung et al., 2021, "Training Neural Networks with Fixed Sparse
      Masks"): the empirical Fisher F_j = mean_n (∂ loss_n/∂θ_j)² over ``fisher_examples`` single examples
      of ``fisher_data`` (:func:`robustft.merge.estimate_fisher`), at the start of training.
    - ``scores="magnitude"``: |θ_start| (the largest weights train; no data needed).
    - ``scores={name: tensor}``: any score of your own, e.g. |θ_ft − θ_0| of a first full fine-tune
      (the "lottery ticket" sparse fine-tuning of Ansell et al., 2022).
    - ``mask_file=path``: a mask saved before (``save_mask``, or this callback's ``save_mask=path``).

    Args:
        density: fraction of the selected entries that train, in (0, 1] (FISH's 0.5% by default).
        fisher_data: iterable of batches (dicts of tensors, e.g. a DataLoader) for ``scores="fisher"``.
        fisher_examples: number of single examples the Fisher averages over (FISH: 1024); under DDP each
            rank's cap: the Fisher is summed over the ranks' examples, so every rank has the same one.
        save_mask: write the mask there (safetensors, main process) once computed; refused if it exists.
        include / exclude: regexes selecting the trainable parameters the mask covers; unselected trainable
            parameters train normally.
    The mask is also saved with every checkpoint, so a resumed run uses the same one.
    """

    state_name = "sparse_update"

    def __init__(
        self,
        density: float = 0.005,
        scores: str | Mapping[str, torch.Tensor] = "fisher",
        fisher_data: Iterable[Mapping[str, torch.Tensor]] | None = None,
        fisher_examples: int = 1024,
        mask_file: str | os.PathLike | None = None,
        save_mask: str | os.PathLike | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        density = check_density("density", density)
        fisher_examples = check_count("fisher_examples", fisher_examples)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        if fisher_examples == 0:
            raise ValueError("fisher_examples must be >= 1, got 0")
        if isinstance(scores, str) and scores not in _SCORES or not isinstance(scores, (str, Mapping)) or (
            isinstance(scores, Mapping) and not all(torch.is_tensor(v) for v in scores.values())
        ):
            raise ValueError(f"scores must be one of {_SCORES} or a mapping name -> tensor, got "
                             f"{short_repr(scores)}")
        if mask_file is not None:
            if not isinstance(mask_file, (str, os.PathLike)) or not Path(mask_file).is_file():
                raise ValueError(f"mask_file: {short_repr(mask_file)} is not an existing file")
            if fisher_data is not None or not (isinstance(scores, str) and scores == "fisher"):
                raise ValueError("mask_file: give either a mask file or scores/fisher_data to compute one, "
                                 "not both")
        elif scores == "fisher" and fisher_data is None:
            raise ValueError("fisher_data: scores='fisher' needs data to estimate the Fisher on (an iterable "
                             "of batches, e.g. a DataLoader), or use scores='magnitude' or mask_file=")
        if save_mask is not None:
            if not isinstance(save_mask, (str, os.PathLike)):
                raise ValueError(f"save_mask must be a file path, got {short_repr(save_mask)}")
            if Path(save_mask).exists():
                raise ValueError(f"save_mask: {save_mask} already exists; choose a new path")
        self.density = density
        self.scores = scores
        self.fisher_data = fisher_data
        self.fisher_examples = fisher_examples
        self.mask_file = mask_file
        self.save_mask = save_mask
        self.include, self.exclude = include, exclude
        self.params: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] | None = None
        self.frozen: FrozenEntries | None = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.masks is None:
            return {}, {}
        return {f"mask.{n}": m.cpu() for n, m in self.masks.items()}, {"names": list(self.masks)}

    def load_state_dict(self, tensors, meta, source: str) -> None:
        if list(meta.get("names", [])) != list(self.params):
            raise ValueError(f"{source}: the saved mask covers other tensors than the selected parameters")
        self.masks = {n: tensors[f"mask.{n}"].bool().to(p.device) for n, p in self.params.items()}

    # -- the mask ---------------------------------------------------------------------------------
    def compute_mask(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The mask for ``model``'s selected parameters from the configured scores (same on every rank)."""
        if self.mask_file is not None:
            return load_mask(self.mask_file, self.params)
        if isinstance(self.scores, Mapping):
            scores = load_scores(self.scores, self.params)
        elif self.scores == "magnitude":
            scores = magnitude_scores(self.params)
        else:
            cuda = sorted({p.device.index or 0 for p in self.params.values() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=cuda):  # the training run's random stream is left as it was
                scores = estimate_fisher(model, self.fisher_data, max_examples=self.fisher_examples,
                                         include=self.include, exclude=self.exclude, across_ranks=True)
        masks = {}
        for n, m in top_k_masks(scores, self.density).items():  # the main process's mask on every rank
            masks[n] = distributed.broadcast_from_main(m.to(self.params[n].device, torch.uint8)).bool()
        return masks

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.params = select_parameters(model, include=self.include, exclude=self.exclude)
        refuse_unsupported(type(self).__name__, self.trainer, self.params)
        resume = self.resume_dir(args, state)
        self.masks = None
        if resume is not None:
            self.load_from(resume)
        if self.masks is None:
            self.masks = {n: m.to(self.params[n].device) for n, m in self.compute_mask(model).items()}
            if self.save_mask is not None and distributed.is_main_process():
                save_mask(self.masks, self.save_mask)
        kept = sum(int(m.sum()) for m in self.masks.values())
        self.pending_logs["sparse/density"] = kept / sum(m.numel() for m in self.masks.values())
        self.frozen = FrozenEntries(self, self.params, self.masks)
        self.frozen.start(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.frozen is not None:
            self.frozen.stop()
            self.frozen = None


def load_scores(
    scores: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """User scores for the selected parameters, each of its parameter's shape (errors name the tensor)."""
    missing = sorted(set(params) - set(scores))
    if missing:
        raise ValueError(f"scores: no score for the selected parameter(s) {short_repr(missing)}")
    for name, p in params.items():
        if tuple(scores[name].shape) != tuple(p.shape):
            raise ValueError(f"scores: {name!r} has shape {tuple(scores[name].shape)}, the parameter "
                             f"{tuple(p.shape)}")
    return {n: scores[n] for n in params}
