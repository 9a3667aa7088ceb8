"""Shrink-and-perturb as a Trainer callback: θ ← λ·θ + σ·ε at task boundaries or every N steps.

Ash & Adams, 2020, "On Warm-Starting Neural Network Training": a model warm-started on earlier data
generalises worse than one trained from scratch; shrinking its weights and adding a little noise when new
data arrives restores that plasticity. The maths is :func:`robustft.ops.perturb.shrink_perturb_`; the
noise ε of tensor i at step t is regenerated from ``noise_seed(seed, t, i)`` like
``RandomPerturbationCallback``'s, so nothing is stored and a run can be reproduced or checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from robustft.callbacks.base import RobustCallback
from robustft.checks import check_bool, check_integer, check_non_negative, check_number, compile_patterns
from robustft.core import distributed
from robustft.core.params import is_sharded, local_tensor, select_parameters
from robustft.ops.perturb import noise_seed, shrink_perturb_

__all__ = ["ShrinkPerturbCallback"]


class ShrinkPerturbCallback(RobustCallback):
    """θ ← λ·θ + σ·ε, ε ~ N(0, I) from a seed, on the selected trainable parameters.

    Strength: Ash & Adams (NeurIPS 2020, "On Warm-Starting Neural Network Training", Sec. 4-5) shrink once
    per warm start, with λ well below 1 and small noise (λ around 0.3-0.6 and σ around 10⁻⁴-10⁻²; from memory,
    not checked here), and show the result depends on both. Applied every few steps inside one run, λ must be
    close to 1 (it compounds). One value per run: sweep λ (or σ) with
    :func:`robustft.analysis.strength.strength_sweep` (``lambda s: ShrinkPerturbCallback(1 - s, sigma)``).

    Args:
        shrink: λ in (0, 1].
        sigma: σ >= 0, the noise's standard deviation.
        every_n_steps: apply after every N-th optimizer step (never after the last one: the trained model
            is returned as trained).
        at_train_begin: apply when a (non-resumed) training run starts: the task boundary when each task
            is its own ``trainer.train()`` on a warm-started model.
        seed: ε of tensor i at step t (0 at train begin) is drawn from ``noise_seed(seed, t, i)``.
        include / exclude: regexes selecting the parameters.
    """

    state_name = "shrink_perturb"

    def __init__(
        self,
        shrink: float,
        sigma: float,
        every_n_steps: int | None = None,
        at_train_begin: bool = False,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        shrink = check_number("shrink", shrink, low=0, high=1, low_open=True)
        sigma = check_non_negative("sigma", sigma)
        check_bool("at_train_begin", at_train_begin)
        if every_n_steps is not None:
            every_n_steps = check_number("every_n_steps", every_n_steps, low=1, integer=True)
        if every_n_steps is None and not at_train_begin:
            raise ValueError("every_n_steps / at_train_begin: say when to shrink and perturb "
                             "(every_n_steps=N or at_train_begin=True)")
        seed = check_integer("seed", seed)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.shrink, self.sigma = float(shrink), float(sigma)
        self.every_n_steps, self.at_train_begin = every_n_steps, at_train_begin
        self.seed = seed
        self.include, self.exclude = include, exclude
        self._params: dict[str, torch.Tensor] = {}
        self._model = None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # nothing to resume (the noise is regenerated from the seed); the options are kept for the record
        return {}, {"shrink": self.shrink, "sigma": self.sigma, "seed": self.seed}

    def apply(self, step: int) -> None:
        """Shrink and perturb the selected parameters now, with the noise of ``step``."""
        shard = distributed.rank() if is_sharded(self._params) else 0  # FSDP2 shards: each draws its own
        if self.shrink == 1.0 and self.sigma == 0.0:
            return
        for i, p in enumerate(self._params.values()):
            seed = noise_seed(self.seed, step, i + (shard << 32))
            shrink_perturb_(local_tensor(p), self.shrink, self.sigma, seed)
        distributed.reshard(self._model)
        self.pending_logs["shrink_perturb/step"] = float(step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._model = model
        self._params = select_parameters(model, include=self.include, exclude=self.exclude)
        owner = self.trainer if self.trainer is not None else self._params
        if distributed.deepspeed_stage(owner) is not None:
            raise ValueError("ShrinkPerturbCallback does not support DeepSpeed: its optimizer keeps master "
                             "weights that would overwrite the shrunk ones; use DDP or FSDP2")
        if self.at_train_begin and self.resume_dir(args, state) is None:
            self.apply(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # right after optimizer.step(), before any callback's on_step_end (averages update there): what an
        # average sees of step ``step`` does not depend on the order of the callback list
        n, step = self.every_n_steps, state.global_step + 1
        if n is not None and step % n == 0 and step < state.max_steps:
            self.apply(step)
