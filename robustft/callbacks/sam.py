"""Exact SAM / ASAM as a ``TrainerCallback``: a second forward/backward at w + ε, replayed by the Trainer.

:class:`SAMCallback` records the step's own micro-batches and, at ``on_pre_optimizer_step``, replays them
through the Trainer's ``training_step`` at w + ε (so ``compute_loss`` overrides, label smoothing,
autocast, loss scaling and gradient-accumulation scaling all hold). The one-pass variants
(MomentumSAM, RWP / Flat-LoRA, LoRA-MGPO) and the base class all variants share are in
``robustft.callbacks.perturbation``; the maths is in ``robustft.ops.perturb``; the Trainer/TRL/GradScaler
internals the replay needs are in ``robustft.core.compat``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from transformers import Trainer

from robustft.callbacks.perturbation import WeightPerturbation
from robustft.checks import check_bool, check_number
from robustft.core import compat, distributed
from robustft.core.params import SelectionGuard, Snapshot, local_tensor
from robustft.ops.perturb import sam_epsilon, sam_norm

__all__ = ["SAMCallback"]


class SAMCallback(WeightPerturbation):
    """Exact SAM (Foret et al., 2021) or, with ``adaptive=True``, ASAM (Kwon et al., 2021).

    At ``on_pre_optimizer_step`` (gradients accumulated over the step's micro-batches, synchronized
    across ranks, clipped): ε = ρ·T²g/‖Tg‖ (T = I, or |w| + η for ASAM) from that gradient - global
    clipping only rescales g, so ε is the same as from the unclipped gradient; the selected weights
    are saved, w ← w + ε, the gradients zeroed, the recorded micro-batches replayed through the
    Trainer's own ``training_step`` (same loss, same gradient-accumulation scaling, same autocast and
    GradScaler), the new gradient clipped as the Trainer does (``max_grad_norm``), and w restored from
    the saved copy (bit-exact, also in bf16, also when the replay raises). ``optimizer.step()`` then
    applies the gradient taken at w + ε.

    Non-finite values: if the step's gradient is non-finite, no perturbation is made and the optimizer
    receives that gradient as it would without SAM (fp16's GradScaler skips such a step; in fp32/bf16
    it reaches the weights). If the gradient is finite but the replay at w + ε gives a non-finite loss
    or gradient (on any rank), the step falls back to the first-pass gradient - the step is the one
    plain training would take - with a warning, counted in ``sam/nonfinite_replays``.

    Cost: one extra forward/backward per step; memory: one copy of the selected parameters, the step's
    micro-batches and, during the replay, the first-pass gradient (kept for the fallback). Dropout masks
    differ between the two passes (as in davda54/sam).

    Strength: Foret et al. choose ρ per task by grid search on held-out training data, over
    {0.01, 0.02, 0.05, 0.1, 0.2, 0.5} (Sec. 3; from memory, not checked against the text here), 0.05 being
    the common default; ASAM's ρ is about 10x larger (Kwon et al.). Sweep ρ on in-distribution data with
    :func:`robustft.analysis.strength.strength_sweep` (``lambda rho: SAMCallback(rho)``).

    Args:
        rho: radius ρ > 0 (typical: 0.05 for SAM, 0.5-2 for ASAM).
        adaptive: ASAM's scale-invariant ε.
        eta: ASAM's η in T = |w| + η (0.01 in the ASAM paper; 0 gives davda54/sam's ASAM).
        schedule: ``"constant"`` or ``"linear"`` (ρ ramps from 0 at ``start_step`` to ρ at the last step).
        start_step: optimizer steps before this one are plain steps.
        include, exclude, skip_norm_and_bias: which trainable parameters are perturbed (regexes,
            see ``select_parameters``); all trainable parameters still get the second gradient.
    Logs ``sam/perturbation_norm`` (‖ε‖) and ``sam/sharpness`` (L(w+ε) − L(w) on the step's batch);
    ``sam/skipped_nonfinite`` and ``sam/nonfinite_replays`` count the steps of each non-finite case.
    """

    state_name = "sam"

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, **kwargs):
        super().__init__(rho, **kwargs)
        eta = check_number("eta", eta, low=0.0)
        check_bool("adaptive", adaptive)
        self.adaptive = adaptive
        self.eta = float(eta)
        self._capturing = False
        self._batches: list[tuple[Any, Any, Any]] = []
        self._losses: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._hook_trainer(required=True)
        self._model = model
        self._params = self._select(model)
        self._guard = SelectionGuard(type(self).__name__, model, self._params)

    def on_step_begin(self, args, state, control, **kwargs):
        self._batches, self._losses = [], []
        self._capturing = self._rho_at(state) > 0

    def _before_micro_batch(self, model, inputs, num_items_in_batch):
        if not self._capturing:
            return None
        return (model, copy.copy(inputs), num_items_in_batch)

    def _after_micro_batch(self, recorded, loss):
        if recorded is not None:
            self._batches.append(recorded)
            self._losses.append(loss.detach())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        batches, losses = self._batches, self._losses
        self._batches, self._losses, self._capturing = [], [], False
        rho = self._rho_at(state)
        if rho <= 0 or not batches:
            return
        if self._guard is not None:  # set at train begin: a module replaced since would go unperturbed
            self._guard.check()
        trainer = self.trainer
        names = list(self._params)
        weights = [local_tensor(self._params[n]) for n in names]
        grads = [None if self._params[n].grad is None else local_tensor(self._params[n].grad) for n in names]
        reduce = self._reduce()
        norm = sam_norm(weights, grads, self.adaptive, self.eta, reduce)
        if not torch.isfinite(norm):
            self._warn_nonfinite(
                state,
                "gradient",
                "the optimizer still receives this gradient (with fp16 the GradScaler skips the step; "
                "otherwise it reaches the weights)",
            )
            return
        model = batches[0][0]
        # the first-pass gradient (references, no copy) and GradScaler state, to fall back on
        first = [(p, p.grad) for p in model.parameters() if p.requires_grad]
        scaler = getattr(trainer.accelerator, "scaler", None)
        scaler_state = compat.grad_scaler_state(scaler)
        saved = Snapshot.of(self._params)  # exact restore, also for bf16 weights
        eps_sq = []
        try:
            with torch.no_grad():
                for w, g in zip(weights, grads, strict=True):
                    e = sam_epsilon(w, g, rho, norm, self.adaptive, self.eta)
                    eps_sq.append(e.pow(2).sum())
                    w.copy_((w.to(e.dtype) + e).to(w.dtype))
            distributed.reshard(self._model)  # FSDP2: the replay gathers the perturbed shards
            loss_perturbed = self._replay(trainer, args, batches)
        finally:
            saved.copy_to(self._params)
            distributed.reshard(self._model)
        if not self._replay_finite(loss_perturbed, [p for p, _ in first], norm.device):
            for p, g in first:
                p.grad = g
            compat.restore_grad_scaler(scaler, scaler_state)
            warnings.warn(
                f"SAMCallback: the replay at w + ε gave a non-finite loss or gradient at step "
                f"{state.global_step}; this step uses the first-pass gradient (a plain, non-SAM step)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._record("nonfinite_replays", 1.0, mean=False)
            return
        del first
        eps_sq = torch.stack([x.to(norm.device) for x in eps_sq]).sum()
        if reduce is not None:
            eps_sq = reduce(eps_sq)
        self._record("perturbation_norm", eps_sq.sqrt().item())
        # each rank saw its own micro-batches: the logged sharpness is the mean over ranks
        sharpness = torch.stack([loss_perturbed - torch.stack(losses).float().sum()]).to(norm.device)
        self._record("sharpness", distributed.all_reduce_mean(sharpness).item())

    @staticmethod
    def _replay_finite(loss: torch.Tensor, params: list[torch.Tensor], device: torch.device) -> bool:
        """True when the replay's loss and every (local) gradient are finite on every rank."""
        bad = [~torch.isfinite(loss.detach()).all()]
        bad += [~torch.isfinite(local_tensor(p.grad)).all() for p in params if p.grad is not None]
        flag = torch.stack([b.to(device) for b in bad]).any().float().reshape(1)
        return distributed.all_reduce_sum(flag).item() == 0  # every rank takes the same branch

    def _replay(self, trainer: Trainer, args, batches) -> torch.Tensor:
        """Second forward/backward at w + ε on the recorded micro-batches; returns Σ of their losses."""
        model = batches[0][0]
        model.zero_grad(set_to_none=True)
        accelerator = trainer.accelerator
        # the first gradient was unscaled by the clip/grad-norm call; let the scaler unscale (and check for
        # inf) the second gradient afresh, as a fresh step would
        compat.reset_grad_scaler(getattr(accelerator, "scaler", None))
        # TRL counts tokens and per-batch metrics inside compute_loss; the replay is not a new batch
        losses = []
        with compat.trl_bookkeeping_kept(trainer):
            for i, (mb_model, inputs, num_items) in enumerate(batches):
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(model=mb_model)
                with sync:
                    losses.append(self._orig_training_step(mb_model, inputs, num_items).detach().float())
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            compat.clip_grad_norm(trainer, model)
        else:
            accelerator.unscale_gradients()
        return torch.stack(losses).sum()
