"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint."""

from robustft.callbacks.averaging import (
    EMACallback,
    LAWACallback,
    MomentumInterpolationCallback,
    SWACallback,
)
from robustft.callbacks.base import RobustCallback
from robustft.callbacks.sam import (
    GGPOCallback,
    MomentumSAMCallback,
    RandomPerturbationCallback,
    SAMCallback,
)

__all__ = [
    "EMACallback",
    "GGPOCallback",
    "LAWACallback",
    "MomentumInterpolationCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "RobustCallback",
    "SAMCallback",
    "SWACallback",
]
