"""Anchor penalties in the training loss: L2-SP, the Fisher (EWC) anchor, spectral regularization and the
Wasserstein distance to the initial weight distribution.

One mechanism for all three (:class:`_AnchorCallback`): the Trainer's ``compute_loss`` is wrapped on the
instance and, during training only, returns loss + c·λ·P(θ), with c chosen so that after the Trainer's own
gradient-accumulation scaling the step's gradient holds ∇(λ·P) exactly once (not once per micro-batch). So the
penalty's gradient goes through the same backward as the data loss: GradScaler scaling and unscaling, the
DDP/DeepSpeed gradient reduction, gradient clipping (it is clipped with the data gradient, like weight decay
written in the loss) and exact SAM's replay all treat it like the data loss. docs/regularizers.md has the
derivation; the maths is in ``robustft.ops.anchor``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from robustft.callbacks.base import RobustCallback
from robustft.checks import check_bool, check_number, compile_patterns
from robustft.core import compat, distributed
from robustft.core.params import SelectionGuard, Snapshot, check_snapshot_spec, is_sharded, select_parameters
from robustft.ops.anchor import (
    anchor_penalty,
    anchor_pull,
    decoupled_anchor_step_,
    sorted_values,
    spectral_penalty,
    top_singular_value,
    wasserstein_penalty,
)

__all__ = ["EWCCallback", "L2SPCallback", "SpectralRegCallback", "WassersteinRegCallback"]


class _AnchorCallback(RobustCallback):
    """Shared mechanism: select parameters, take the start state, add c·λ·P(θ) to the loss, checkpoint.

    Args:
        strength: λ >= 0; 0 leaves training exactly as without the callback.
        include, exclude: regex name patterns of the trainable parameters penalized (default: all).
    """

    #: metric prefix
    prefix = "anchor"

    def __init__(self, strength: float, *, include: str | list[str] | None = None,
                 exclude: str | list[str] | None = None, resume_state_from: str | None = None,
                 restart_if_missing: bool = False):
        super().__init__(resume_state_from=resume_state_from, restart_if_missing=restart_if_missing)
        self.strength = float(check_number("strength", strength, low=0.0))
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.include, self.exclude = include, exclude
        self.params: dict[str, torch.Tensor] | None = None
        self.guard: SelectionGuard | None = None
        self._last_penalty: torch.Tensor | None = None

    # -- what subclasses provide ---------------------------------------------------------------
    def _take_start(self, model: nn.Module, resuming: bool) -> None:
        """Record what the penalty anchors to (the weights, Fisher, singular values) at train begin."""
        raise NotImplementedError

    def penalty(self) -> torch.Tensor:
        """P(θ) on the live selected weights (without λ), differentiable in them."""
        raise NotImplementedError

    def _in_loss(self) -> bool:
        """True when the penalty goes into the loss (decoupled L2-SP acts in the optimizer step instead)."""
        return self.strength > 0

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.trainer is None:
            raise RuntimeError(
                f"{type(self).__name__}: no Trainer found; pass the callback to a transformers.Trainer "
                "(or call .attach(trainer)) so its penalty can enter the training loss"
            )
        params = select_parameters(model, include=self.include, exclude=self.exclude)
        if is_sharded(params):
            raise ValueError(
                f"{type(self).__name__}: sharded parameters (FSDP2, DeepSpeed ZeRO-3) are not supported: the "
                "penalty needs the whole local weight in the autograd graph; use DDP or ZeRO-1/2"
            )
        self.params = params
        self.guard = SelectionGuard(type(self).__name__, model, params)
        checkpoint = self.resume_dir(args, state)
        self._take_start(model, resuming=checkpoint is not None)
        if checkpoint is not None:
            self.load_from(checkpoint)
        if self._in_loss():
            self._hook_compute_loss()

    def _hook_compute_loss(self) -> None:
        """Wrap ``trainer.compute_loss``: loss + c·λ·P, c = (Trainer's divisor)/(micro-batches per step)."""

        def make_wrapper(original: Callable) -> Callable:
            def compute_loss(model, inputs, *args, **kwargs):
                result = original(model, inputs, *args, **kwargs)
                if not (model.training and torch.is_grad_enabled()):  # evaluation: the data loss only
                    return result
                num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
                divisor, micro_batches = compat.trainer_loss_accumulation(self.trainer, num_items)
                self.guard.check()
                device = next(iter(self.params.values())).device
                with torch.autocast(device.type, enabled=False):  # the penalty in float32 whatever autocast
                    value = self.strength * self.penalty()
                self._last_penalty = value.detach()
                term = value * (divisor / micro_batches)
                if isinstance(result, tuple):
                    return (result[0] + term, *result[1:])
                return result + term

            return compute_loss

        self.wrap_method("compute_loss", make_wrapper)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log and self._last_penalty is not None:
            self.pending_logs[f"{self.prefix}/penalty"] = float(self._last_penalty)

    def on_train_end(self, args, state, control, **kwargs):
        self.unwrap_method("compute_loss")
        super().on_train_end(args, state, control, **kwargs)

    # -- helpers ----------------------------------------------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        return list(self.params.values())


class L2SPCallback(_AnchorCallback):
    """L2-SP (Li et al., ICML 2018): λ/2·‖θ − θ_start‖² on the selected parameters, θ_start = the weights when
    training begins.

    With ``decoupled=True`` nothing enters the loss; instead each optimizer step becomes
    θ_{t+1} = step(θ_t) − lr·λ·(θ_t − θ_start), the pull taken on the pre-step θ_t (lr of the parameter's
    group at that step), as AdamW's decoupled weight decay (θ·(1 − lr·wd) on the pre-step θ), toward θ_start.
    With plain SGD (no momentum, no weight decay) both forms therefore give the same step; with momentum or
    Adam the decoupled pull bypasses the momentum and second-moment estimates. The pull is exact for any
    optimizer and costs one copy of the selected weights (float32 or wider) while ``optimizer.step()`` runs;
    a step the GradScaler skips gets no pull (as AdamW's decay).

    Strength: no value transfers. The paper (Sec. 4, experimental setup) picks its α (this λ) per target
    task by cross-validation on a grid over orders of magnitude (about 10⁻³ to 1; the exact grid is from
    memory, not checked against the text here). Measured in docs/regularizers.md: λ = 1 gains 17 points under
    shift on the demo task and loses on another task (issue 28). Sweep it on in-distribution data:
    :func:`robustft.analysis.strength.strength_sweep`.

    Args:
        strength: λ >= 0.
        decoupled: apply the pull toward θ_start in the optimizer step instead of the loss.
        dtype: dtype of the θ_start copy (``"auto"``: float32 for 16-bit weights).
        include, exclude: regex name patterns of the trainable parameters anchored (default: all).
    Logs ``l2sp/penalty`` (λ·P at the last micro-batch, loss form only).
    """

    prefix = "l2sp"
    state_name = "l2sp"

    def __init__(self, strength: float, *, decoupled: bool = False, dtype: str | torch.dtype | None = "auto",
                 **kwargs: Any):
        super().__init__(strength, **kwargs)
        check_bool("decoupled", decoupled)
        check_snapshot_spec("same", dtype)
        self.decoupled = decoupled
        self.dtype = dtype
        self.start: Snapshot | None = None
        self._armed = False  # set at on_pre_optimizer_step: the next optimizer.step() is the Trainer's
        self._optimizer = None  # whose step carries the decoupled pull

    def _take_start(self, model, resuming):
        self.start = Snapshot.of(self.params, dtype=self.dtype)

    def penalty(self):
        return anchor_penalty(self._live(), self.start.tensors)

    def _in_loss(self):
        return self.strength > 0 and not self.decoupled

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._armed = False
        if self.decoupled and self.strength > 0:
            self._hook_optimizer_step(optimizer if optimizer is not None else self.trainer.optimizer)

    def _hook_optimizer_step(self, optimizer) -> None:
        """Wrap ``optimizer.step``: the pull is taken on the pre-step θ in it, subtracted after the update.

        Inside the step, not at ``on_pre_optimizer_step``: a one-pass perturbation undone there, or any other
        callback's edit before the step, is then already undone whatever the order of the callback list.
        """
        if optimizer is None:
            raise ValueError("L2SPCallback(decoupled=True): the Trainer passed no optimizer to the callback")
        if distributed.deepspeed_stage(self.trainer) is not None:
            raise ValueError("L2SPCallback(decoupled=True) does not support DeepSpeed: its engine steps its "
                             "own fp32 master weights inside the backward; use the loss form")
        current = optimizer.step

        def make_wrapper(original):
            def step(*args, **kwargs):
                armed, self._armed = self._armed, False  # only the Trainer's step after on_pre_optimizer_step
                if not armed:
                    return original(*args, **kwargs)
                live = self._live()
                pulls = anchor_pull(live, self.start.tensors, self._factors(optimizer, live))
                result = original(*args, **kwargs)
                if not getattr(optimizer, "step_was_skipped", False):
                    decoupled_anchor_step_(live, pulls)
                return result

            # carry the marks of the step we wrap (the LR scheduler's check that step() is its own)
            return functools.update_wrapper(step, current)

        self.wrap_method("step", make_wrapper, target=optimizer)
        self._optimizer = optimizer

    def _factors(self, optimizer, live: list[torch.Tensor]) -> list[float]:
        """lr·λ per selected tensor, with the lr of its optimizer group at this step."""
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.params.items() if id(p) not in lr_of]
        if missing:
            raise ValueError(f"L2SPCallback(decoupled=True): {missing[0]!r} is in no optimizer param group")
        return [lr_of[id(p)] * self.strength for p in live]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.decoupled and self.strength > 0:
            self.guard.check()
            self._armed = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._optimizer is not None:
            self.unwrap_method("step", target=self._optimizer)
            self._optimizer = None
        super().on_train_end(args, state, control, **kwargs)

    def state_dict(self):
        return self.start.state_dict(), {}

    def load_state_dict(self, tensors, meta, source):
        self.start.load_state_dict(tensors, source=source)


class EWCCallback(_AnchorCallback):
    """Fisher anchor (EWC, Kirkpatrick et al., PNAS 2017, Eq. 3): λ/2·Σ_i F_i(θ_i − θ_start,i)².

    F is the empirical diagonal Fisher of :func:`robustft.merge.estimate_fisher`: given (``fisher``, name ->
    tensor, e.g. saved by ``save_fisher``), or estimated at train begin on the weights θ_start from
    ``fisher_data`` (an iterable of batches; its first ``fisher_max_examples`` examples). F and θ_start are
    saved with the callback's state, so a resumed run does not estimate F again.

    Strength: λ multiplies F, whose scale depends on the loss and the data, so λ has no unit that transfers;
    the paper sets it per experiment by search (Methods; values from memory, not checked here: λ of 10² to 10⁴
    are what later work reuses). A starting point is λ = 1/mean(F) (the L2-SP strength on average); sweep λ
    on in-distribution data with :func:`robustft.analysis.strength.strength_sweep` (docs/regularizers.md).

    Args:
        strength: λ >= 0.
        fisher: precomputed Fisher (must hold every selected parameter, same shapes); or
        fisher_data: batches to estimate it on when training begins (exactly one of the two).
        fisher_max_examples, fisher_loss_fn: passed to ``estimate_fisher``.
        include, exclude: regex name patterns of the trainable parameters anchored (default: all).
    Logs ``ewc/penalty``.
    """

    prefix = "ewc"
    state_name = "ewc"

    def __init__(self, strength: float, *, fisher: Mapping[str, torch.Tensor] | None = None,
                 fisher_data: Iterable[Mapping[str, torch.Tensor]] | None = None,
                 fisher_max_examples: int | None = None,
                 fisher_loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
                 **kwargs: Any):
        super().__init__(strength, **kwargs)
        if (fisher is None) == (fisher_data is None):
            raise ValueError("EWCCallback: pass exactly one of fisher (name -> tensor) and fisher_data")
        if fisher is not None:
            if not isinstance(fisher, Mapping) or not all(torch.is_tensor(t) for t in fisher.values()):
                raise ValueError("fisher must map parameter names to tensors")
            bad = [n for n, t in fisher.items() if not bool(torch.isfinite(t).all()) or bool((t < 0).any())]
            if bad:
                raise ValueError(f"fisher: tensor {bad[0]!r} has negative or non-finite entries")
        if fisher_max_examples is not None:
            fisher_max_examples = check_number("fisher_max_examples", fisher_max_examples, low=1,
                                               integer=True)
        if fisher_loss_fn is not None and not callable(fisher_loss_fn):
            raise ValueError(f"fisher_loss_fn must be callable, got {type(fisher_loss_fn).__name__}")
        self.fisher_given = fisher
        self.fisher_data, self.fisher_max_examples, self.fisher_loss_fn = (
            fisher_data, fisher_max_examples, fisher_loss_fn)
        self.start: Snapshot | None = None
        self.fisher: Snapshot | None = None

    def _take_start(self, model, resuming):
        self.start = Snapshot.of(self.params, dtype="auto")
        if self.fisher_given is not None:
            source = self.fisher_given
        elif resuming:  # loaded from the checkpoint right after this
            source = {n: torch.zeros(p.shape) for n, p in self.params.items()}
        else:
            from robustft.core.statistics import estimate_fisher

            source = estimate_fisher(model, self.fisher_data, max_examples=self.fisher_max_examples,
                                     loss_fn=self.fisher_loss_fn, include=self.include, exclude=self.exclude)
        zeros = [torch.zeros(p.shape, device=p.device) for p in self._live()]
        self.fisher = Snapshot(list(self.params), zeros)
        try:
            self.fisher.load_state_dict(source, source="the Fisher")
        except ValueError as err:
            raise ValueError(f"EWCCallback: fisher does not match the selected parameters: {err}") from err

    def penalty(self):
        return anchor_penalty(self._live(), self.start.tensors, self.fisher.tensors)

    def state_dict(self):
        return {**self.start.state_dict("start."), **self.fisher.state_dict("fisher.")}, {}

    def load_state_dict(self, tensors, meta, source):
        self.start.load_state_dict(tensors, prefix="start.", source=source)
        self.fisher.load_state_dict(tensors, prefix="fisher.", source=source)


class SpectralRegCallback(_AnchorCallback):
    """Spectral regularization (Lewandowski et al., "Learning Continually by Spectral Regularization", ICLR
    2025, Sec. 3): λ·Σ_l (σ₁(W_l)^k − τ_l^k)² over the selected weight matrices (tensors of 2+ dimensions,
    viewed as (out, in·…); 1-D parameters are left alone).

    ``target="start"`` (default) keeps each σ₁ near its value when training begins (τ_l = σ₁(W_l,start));
    ``target="one"`` is the paper's τ = 1. σ₁ is computed exactly (``torch.linalg.matrix_norm(ord=2)``, an SVD
    per matrix per micro-batch): select the matrices that matter with ``include`` on large models.

    Strength: the paper sweeps λ over orders of magnitude in its hyperparameter-sensitivity study (Sec. 5 and
    the appendix; the grid is not checked here) and reports the regularizer as less sensitive to λ than L2
    toward the init. Its setting is continual learning over many tasks; in one short fine-tuning run σ₁ moves
    little, so λ matters little (docs/regularizers.md). Sweep it with
    :func:`robustft.analysis.strength.strength_sweep`.

    Args:
        strength: λ >= 0.
        power: k >= 1 (the paper's default is 2).
        target: ``"start"`` or ``"one"``.
        include, exclude: regex name patterns of the trainable parameters regularized (default: all).
    Logs ``spectral/penalty``.
    """

    prefix = "spectral"
    state_name = "spectral"

    def __init__(self, strength: float, *, power: int = 2, target: str = "start", **kwargs: Any):
        super().__init__(strength, **kwargs)
        power = check_number("power", power, low=1, integer=True)
        if target not in ("start", "one"):
            raise ValueError(f"target must be 'start' or 'one', got {target!r}")
        self.power, self.target = power, target
        self.targets: torch.Tensor | None = None

    def _matrices(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.ndim >= 2]

    def _take_start(self, model, resuming):
        matrices = self._matrices()
        if not matrices:
            raise ValueError("SpectralRegCallback: no selected parameter is a matrix (2+ dimensions)")
        with torch.no_grad():
            if self.target == "one":
                self.targets = torch.ones(len(matrices), dtype=torch.float64)
            else:
                self.targets = torch.stack([top_singular_value(w.detach()).double().cpu() for w in matrices])
        if not bool(torch.isfinite(self.targets).all()):
            raise ValueError("SpectralRegCallback: a selected matrix has a non-finite largest singular value")

    def penalty(self):
        return spectral_penalty(self._matrices(), list(self.targets), self.power)

    def state_dict(self):
        return {"targets": self.targets}, {"power": self.power, "target": self.target}

    def load_state_dict(self, tensors, meta, source):
        saved = tensors.get("targets")
        if saved is None or tuple(saved.shape) != tuple(self.targets.shape):
            raise ValueError(f"{source}: 'targets' missing or not of shape {tuple(self.targets.shape)}")
        self.targets = saved.to(torch.float64)



class WassersteinRegCallback(_AnchorCallback):
    """Wasserstein-to-init regularization (Lewandowski et al., arXiv:2312.00246; the distributional baseline
    of "Learning Continually by Spectral Regularization"): λ·Σ_t Σ_i (θ_t,(i) − θ⁰_t,(i))², per selected
    tensor the sorted current entries against the sorted entries it had when training began
    (:func:`robustft.ops.anchor.wasserstein_penalty`).

    Unlike L2-SP it anchors each tensor's weight *distribution*, not each weight: units may swap roles.
    Costs one sort per selected tensor per micro-batch and one sorted float32 copy of the selection.

    Args:
        strength: λ >= 0.
        include, exclude: regex name patterns of the trainable parameters regularized (default: all).
    Logs ``wasserstein/penalty``.
    """

    prefix = "wasserstein"
    state_name = "wasserstein"

    def __init__(self, strength: float, **kwargs: Any):
        super().__init__(strength, **kwargs)
        self.start: Snapshot | None = None

    def _take_start(self, model, resuming):
        with torch.no_grad():
            self.start = Snapshot(list(self.params), [sorted_values(p.detach()) for p in self._live()])

    def penalty(self):
        return wasserstein_penalty(self._live(), self.start.tensors)

    def state_dict(self):
        return self.start.state_dict(), {}

    def load_state_dict(self, tensors, meta, source):
        self.start.load_state_dict(tensors, source=source)
