"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint."""

from robustft.callbacks.sam import (  # noqa: E402
    GGPOCallback,
    MomentumSAMCallback,
    RandomPerturbationCallback,
    SAMCallback,
)

__all__ = ["GGPOCallback", "MomentumSAMCallback", "RandomPerturbationCallback", "SAMCallback"]
