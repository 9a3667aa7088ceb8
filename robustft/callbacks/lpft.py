"""LP-FT as a Trainer callback: a linear probe (backbone frozen, head trained), then full fine-tuning.

Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution":
fine-tuning from a random head distorts the pretrained features; training the head first (linear probing)
and then everything keeps them and does better out of distribution. The Trainer builds one optimizer
with every trainable parameter before training, so the backbone is frozen *inside* that optimizer by
:class:`robustft.callbacks.sparse.FrozenEntries` (gradient masked at backward so clipping sees only the
head, gradient dropped before the step so AdamW neither decays nor builds state for it, and its values
restored after every step): bit-identical through the probe phase. At the boundary the backbone starts
training with a fresh optimizer state (its first step is Adam's first step).

Two forms (docs/regularizers.md#lp-ft): by default one run with the Trainer's one learning-rate schedule
over both phases, the head keeping its optimizer state across the boundary; ``two_stage=True`` is the
paper's procedure, two trainings: each stage gets its own fresh schedule (the Trainer's kind and warmup,
over the stage's steps; ``compat.restart_lr_schedule``) and the fine-tuning stage starts with a fresh
optimizer state for every parameter, the head included, all inside one ``trainer.train()``.

With :class:`~robustft.callbacks.wise_ft.WiseFTCallback` on the same Trainer (either order of the
callback list), ``interpolate_from_probe=True`` makes the probed model its θ_start: at the boundary the
WiSE-FT start is re-taken from the live weights, so θ(α) lies between the probed and the fine-tuned model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from robustft.callbacks.base import RobustCallback
from robustft.callbacks.sparse import FrozenEntries, refuse_unsupported
from robustft.callbacks.wise_ft import WiseFTCallback
from robustft.checks import check_bool, check_number, compile_patterns, short_repr
from robustft.core.compat import restart_lr_schedule
from robustft.core.params import select_parameters

__all__ = ["DEFAULT_HEAD", "LPFTCallback"]

logger = logging.getLogger(__name__)

#: the classification / LM heads of transformers models (``classifier``, ``score``, ``lm_head``)
DEFAULT_HEAD = r"(^|\.)(classifier|score|lm_head)\."


class LPFTCallback(RobustCallback):
    """Linear probe for ``probe_steps`` optimizer steps (or ``probe_epochs`` epochs), then full fine-tuning.

    Args:
        probe_steps: optimizer steps of the probe phase (give this or ``probe_epochs``).
        probe_epochs: whole epochs of the probe phase.
        head: regex(es) of the head's parameter names (trained in both phases); every other trainable
            parameter is the backbone, frozen during the probe.
        interpolate_from_probe: hand the probed model to every attached ``WiseFTCallback`` as its start.
        two_stage: the paper's two trainings in one run: a fresh learning-rate schedule for each stage (the
            probe's over its steps, the fine-tuning's over the rest) and a fresh optimizer state for every
            parameter at the boundary. Default False: one schedule over the whole run, the head's optimizer
            state kept (only the backbone starts fresh).
    """

    state_name = "lp_ft"

    def __init__(
        self,
        probe_steps: int | None = None,
        probe_epochs: int | None = None,
        head: str | Sequence[str] = DEFAULT_HEAD,
        interpolate_from_probe: bool = True,
        two_stage: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if (probe_steps is None) == (probe_epochs is None):
            raise ValueError(
                "probe_steps / probe_epochs: give exactly one length for the probe phase, got "
                f"probe_steps={short_repr(probe_steps)}, probe_epochs={short_repr(probe_epochs)}"
            )
        if probe_steps is not None:
            probe_steps = check_number("probe_steps", probe_steps, low=1, integer=True)
        if probe_epochs is not None:
            probe_epochs = check_number("probe_epochs", probe_epochs, low=1, integer=True)
        if not (isinstance(head, str) and head) and not (
            isinstance(head, Sequence) and head and all(isinstance(h, str) and h for h in head)
        ):
            raise ValueError(f"head must be a regex or a list of regexes of parameter names, got "
                             f"{short_repr(head)}")
        check_bool("interpolate_from_probe", interpolate_from_probe)
        check_bool("two_stage", two_stage)
        compile_patterns("head", head)
        self.probe_steps, self.probe_epochs = probe_steps, probe_epochs
        self.head = head
        self.interpolate_from_probe = interpolate_from_probe
        self.two_stage = two_stage
        self.probe_length: int | None = None
        self.optimizer = None
        self.probing = False
        self.boundary_step: int | None = None
        self.frozen: FrozenEntries | None = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"probing": self.probing, "boundary_step": self.boundary_step}

    def load_state_dict(self, tensors, meta, source: str) -> None:
        if "probing" not in meta:
            raise ValueError(f"{source}: not an LP-FT state (no 'probing' entry)")
        self.probing, self.boundary_step = bool(meta["probing"]), meta.get("boundary_step")

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        params = select_parameters(model)
        try:
            head = select_parameters(model, include=self.head)
        except ValueError as err:
            raise ValueError(f"head: {err}") from err
        backbone = {n: p for n, p in params.items() if n not in head}
        if not backbone:
            raise ValueError(f"head: {short_repr(self.head)} matches every trainable parameter; "
                             "nothing to probe")
        refuse_unsupported(type(self).__name__, self.trainer, params)
        self.probing, self.boundary_step = True, None
        self.optimizer = optimizer
        self.probe_length = self._probe_length(args, state, kwargs.get("train_dataloader"))
        resume = self.resume_dir(args, state)
        if resume is not None:
            self.load_from(resume)
        if self.two_stage:
            self._stage_schedule(state, resumed=resume is not None)
        if not self.probing:
            return
        self.frozen = FrozenEntries(self, backbone, {n: torch.zeros((), dtype=torch.bool) for n in backbone})
        self.frozen.start(optimizer)
        self.pending_logs["lpft/probing"] = 1.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.probing and self.probe_steps is not None and state.global_step >= self.probe_steps:
            self._end_probe(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.probing and self.probe_epochs is not None and state.epoch >= self.probe_epochs - 1e-9:
            self._end_probe(state)

    def _probe_length(self, args, state, train_dataloader) -> int:
        """Optimizer steps of the probe phase (``probe_epochs`` × the Trainer's update steps per epoch)."""
        if self.probe_steps is not None:
            return self.probe_steps
        if train_dataloader is None or not hasattr(train_dataloader, "__len__"):
            if self.two_stage:
                raise ValueError("two_stage: probe_epochs needs a train dataloader of known length to size "
                                 "the probe's schedule; give probe_steps")
            return 0  # unused: the boundary comes at an epoch end
        batches, accumulation = len(train_dataloader), args.gradient_accumulation_steps
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)  # as the Trainer counts
        return self.probe_epochs * per_epoch

    def _stage_schedule(self, state, resumed: bool) -> None:
        """Two-stage form: the current stage's own schedule (from train begin, or continued on resume)."""
        if self.probing:
            steps = self.probe_length
        else:
            steps = state.max_steps - self.boundary_step
        if self.trainer is None:
            raise ValueError("two_stage: no Trainer found; call callback.attach(trainer) before train()")
        saved = self.trainer.lr_scheduler.state_dict() if resumed else None
        restart_lr_schedule(self.trainer, max(steps, 1), state=saved)

    def _end_probe(self, state) -> None:
        """The phase boundary: the backbone trains from the next step; WiSE-FT restarts from the probe."""
        self.frozen.stop()
        self.frozen = None
        self.probing, self.boundary_step = False, state.global_step
        if self.two_stage:  # a second training: fresh optimizer state for every parameter, a fresh schedule
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            inner.state.clear()
            if state.max_steps > state.global_step:
                restart_lr_schedule(self.trainer, state.max_steps - state.global_step)
        if self.interpolate_from_probe:
            for cb in self._attached():
                if isinstance(cb, WiseFTCallback):
                    cb.restart_from_live()
        self.pending_logs["lpft/probing"] = 0.0
        self.pending_logs["lpft/boundary_step"] = float(state.global_step)
        logger.info("LP-FT: linear probe done at step %d; fine-tuning every parameter", state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.frozen is not None:
            self.frozen.stop()
            self.frozen = None
