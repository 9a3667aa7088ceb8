"""WARP's EMA anchor in TRL: the reference the KL/DPO term is computed against is the EMA of the policy.

After every optimizer step ref ← β·ref + (1−β)·policy on the trained parameters, held where TRL already
keeps its reference, so no further copy of the model is made:

- full fine-tuning: in the weights of TRL's reference model (``trainer.ref_model``); the same EMA as TRL's
  ``sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1−β``;
- PEFT: in a second adapter named ``"ref"`` beside the trained one, which TRL's DPO/GRPO/RLOO trainers
  activate for the reference forward when it exists (without it they disable the adapters: the base
  model). The reference is the base model plus the EMA of the adapter's factors, a case TRL's
  ``sync_ref_model`` refuses.

The EMA maths, selection, warmup and checkpointing are :class:`~robustft.callbacks.averaging.EMACallback`'s;
only where the average lives differs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from robustft.callbacks.averaging import EMACallback
from robustft.core.compat import TRL_REF_ADAPTER, trl_reference_model
from robustft.core.params import Snapshot, full_shape, is_sharded, live_tensors
from robustft.lora.layers import is_peft_model
from robustft.ops.averaging import ema_update_

__all__ = ["EMAReferenceCallback"]


class EMAReferenceCallback(EMACallback):
    """The reference model of a TRL trainer (DPO; GRPO/RLOO share its reference path) follows the EMA of the
    policy: ref ← β·ref + (1−β)·policy after each update step, starting from the reference TRL built (the
    initial policy), as WARP's "EMA anchor" (Ramé et al., 2024).

    Full models: the EMA is held in ``trainer.ref_model``'s weights. PEFT policies: in an adapter
    ``"ref"`` (created as a copy of the trained adapter, dropout off; TRL's own ``"ref"`` copy of a
    pretrained adapter is used as it is), which TRL activates for the reference forward; the base model is
    not copied. The EMA is of the adapter's factors (A and B separately). Single process or DDP;
    FSDP2/ZeRO-3 are refused.

    Args:
        decay: β in (0, 1); TRL's ``ref_model_mixup_alpha`` is 1 − β.
        warmup, warmup_gamma, warmup_power, update_every, start_step, include, exclude: as
            :class:`~robustft.callbacks.averaging.EMACallback` (parameters outside the selection keep their
            start values in the reference).
        eval_with_ema: evaluate the policy with the EMA weights swapped in (default off: evaluation scores
            the trained policy against the reference). ``save_dir``: save the EMA policy at the end
            (default None).
    """

    prefix = "ema_ref"
    state_name = "ema_reference"

    def __init__(self, decay: float = 0.99, *, eval_with_ema: bool = False, save_dir: str | None = None,
                 **kwargs: Any):
        for option in ("device", "dtype"):
            if option in kwargs:
                raise ValueError(f"EMAReferenceCallback: {option} is not an option: the EMA is held in the "
                                 "reference model's own weights (device and dtype as TRL built it)")
        super().__init__(decay, eval_with_ema=eval_with_ema, save_dir=save_dir, **kwargs)

    def has_average(self) -> bool:
        """The reference exists from the start (the initial policy), so it is an average from the start."""
        return self.params is not None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = None  # each train() finds its trainer's reference again
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _init_average(self) -> None:
        self.num_updates = 0
        self.avg = Snapshot(list(self.params), self._reference_tensors())

    def _update(self, step: int) -> None:
        # no first-update copy as in EMACallback: the EMA starts at the reference TRL built, as sync_ref_model
        ema_update_(self.avg.tensors, live_tensors(self.params), self.current_decay())

    # -- where the EMA lives ----------------------------------------------------------------------
    def _reference_tensors(self) -> list[torch.Tensor]:
        """The reference's tensors matching ``self.params`` in order (checked before any step)."""
        trainer = self.trainer
        if trainer is None:
            raise ValueError("EMAReferenceCallback: no Trainer found; pass it to a TRL trainer "
                             "(callbacks=[...]) or attach(trainer)")
        ref_model = trl_reference_model(trainer)
        trl_args = trainer.args
        if getattr(trl_args, "sync_ref_model", False):
            raise ValueError("EMAReferenceCallback: sync_ref_model=True would move the reference a second "
                             "time; set sync_ref_model=False (this callback is the EMA anchor)")
        if getattr(trl_args, "precompute_ref_log_probs", False):
            raise ValueError("EMAReferenceCallback: precompute_ref_log_probs=True computes the reference "
                             "once, before training, so it could not follow the EMA; set it to False")
        if getattr(trl_args, "beta", None) == 0.0:
            raise ValueError("EMAReferenceCallback: beta=0.0, so the trainer computes no reference; "
                             "set beta > 0")
        if (is_sharded(self.params) or getattr(trainer, "is_deepspeed_enabled", False)
                or getattr(trainer, "is_fsdp_enabled", False)):
            raise NotImplementedError("EMAReferenceCallback supports one process or DDP; FSDP and DeepSpeed "
                                      "(sharded policy or reference) are not supported yet")
        if is_peft_model(self.model):
            if ref_model is not None:
                raise ValueError("EMAReferenceCallback: with a PEFT policy the reference is the base model "
                                 "plus the EMA adapter; do not pass a separate ref_model to the trainer")
            return _ema_adapter(self.model, self.params)
        if ref_model is None:
            raise ValueError(f"EMAReferenceCallback: {type(trainer).__name__} holds no reference model "
                             "(e.g. GRPO/RLOO with beta=0.0, or precomputed reference log-probs): nothing to "
                             "anchor")
        return _matching(ref_model, self.params, "the reference model")


def _matching(owner: torch.nn.Module, params: dict[str, torch.Tensor], what: str,
              rename=lambda name: name) -> list[torch.Tensor]:
    """``owner``'s tensors named ``rename(n)`` for every selected name ``n``, detached (they share storage),
    with the shape, dtype and device of the policy's (an error naming the first that differs)."""
    named = dict(owner.named_parameters())
    named.update((n, b) for n, b in owner.named_buffers() if n not in named)
    out = []
    for name, p in params.items():
        t = named.get(rename(name))
        if t is None:
            raise ValueError(f"EMAReferenceCallback: {what} has no tensor {rename(name)!r} for the policy's "
                             f"{name!r}; the reference must have the policy's architecture")
        if tuple(full_shape(t)) != tuple(full_shape(p)) or t.device != p.device:
            raise ValueError(f"EMAReferenceCallback: {what}'s {rename(name)!r} is {tuple(t.shape)} on "
                             f"{t.device}, the policy's {name!r} {tuple(p.shape)} on {p.device}")
        out.append(t.detach())
    return out


def _ema_adapter(model, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of the ``"ref"`` adapter that will hold the EMA of the trained adapter, created as a copy
    of it (frozen, dropout off) when TRL has not already made one (it copies a pretrained adapter)."""
    active = model.active_adapter
    ref = TRL_REF_ADAPTER
    if active == ref:
        raise ValueError(f"EMAReferenceCallback: the trained adapter is named {ref!r}, the name TRL gives "
                         "the reference adapter; rename it")
    tag, ref_tag = f".{active}.", f".{ref}."
    outside = [n for n in params if tag not in n]
    if outside:
        raise ValueError(f"EMAReferenceCallback: {outside[0]!r} is trained but not part of adapter "
                         f"{active!r}, so the reference adapter cannot hold its EMA; freeze it or exclude it")
    if ref not in model.peft_config:
        config = copy.deepcopy(model.peft_config[active])
        config.inference_mode = True
        if hasattr(config, "lora_dropout"):
            config.lora_dropout = 0.0  # the reference forward is deterministic, as TRL's frozen reference
        model.add_adapter(ref, config)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in named.items():
                if tag in name:
                    named[name.replace(tag, ref_tag)].copy_(t)
        trained = [n for n, p in params.items() if not p.requires_grad]
        if trained or model.active_adapter != active:
            raise RuntimeError(f"EMAReferenceCallback: adding adapter {ref!r} changed the trained adapter "
                               f"{active!r} (active {model.active_adapter!r}, frozen {trained[:3]})")
    return _matching(model, params, f"adapter {ref!r}", rename=lambda n: n.replace(tag, ref_tag))
