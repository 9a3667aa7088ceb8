"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint."""

from robustft.callbacks.averaging import (
    EMACallback,
    LAWACallback,
    MomentumInterpolationCallback,
    SWACallback,
)
from robustft.callbacks.base import RobustCallback
from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback
from robustft.callbacks.perturbation import GGPOCallback, MomentumSAMCallback, RandomPerturbationCallback
from robustft.callbacks.sam import SAMCallback
from robustft.callbacks.wise_ft import WiseFTCallback

__all__ = [
    "EMACallback",
    "GGPOCallback",
    "LAWACallback",
    "LoRAArithmeticCallback",
    "MomentumInterpolationCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "RobustCallback",
    "SAMCallback",
    "SWACallback",
    "WiseFTCallback",
]
