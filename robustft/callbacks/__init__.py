"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint."""

from robustft.callbacks.averaging import (
    EMACallback,
    LAWACallback,
    MomentumInterpolationCallback,
    SWACallback,
)
from robustft.callbacks.base import RobustCallback

__all__ = ["EMACallback", "LAWACallback", "MomentumInterpolationCallback", "RobustCallback", "SWACallback"]
