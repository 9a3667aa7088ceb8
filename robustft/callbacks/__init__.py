"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint.

Each callback is imported on first use (PEP 562), so ``import robustft.callbacks`` alone does not
import transformers.
"""

from typing import TYPE_CHECKING

from robustft._lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from robustft.callbacks.anchor import (
        EWCCallback,
        L2SPCallback,
        SpectralRegCallback,
        WassersteinRegCallback,
    )
    from robustft.callbacks.averaging import (
        BEMACallback,
        EMACallback,
        LAWACallback,
        MomentumInterpolationCallback,
        SWACallback,
    )
    from robustft.callbacks.base import RobustCallback
    from robustft.callbacks.ema_reference import EMAReferenceCallback
    from robustft.callbacks.forgetting import ForgettingCallback
    from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback
    from robustft.callbacks.lpft import LPFTCallback
    from robustft.callbacks.perturbation import (
        MGPOCallback,
        MomentumSAMCallback,
        RandomPerturbationCallback,
    )
    from robustft.callbacks.plasticity import ContinualBackpropCallback, ShrinkPerturbCallback
    from robustft.callbacks.sam import SAMCallback
    from robustft.callbacks.soup import SoupCallback
    from robustft.callbacks.sparse import SparseUpdateCallback, load_mask, save_mask
    from robustft.callbacks.wise_ft import WiseFTCallback

#: the one registration point of a callback: module -> its public names. ``__all__``, the lazy look-up and
#: ``robustft``'s own exports (:data:`CALLBACKS`) are derived from it; the ``TYPE_CHECKING`` imports above
#: mirror it for IDEs (tests/test_imports.py checks that they agree).
EXPORTS: dict[str, tuple[str, ...]] = {
    "robustft.callbacks.anchor": (
        "EWCCallback",
        "L2SPCallback",
        "SpectralRegCallback",
        "WassersteinRegCallback",
    ),
    "robustft.callbacks.averaging": (
        "BEMACallback",
        "EMACallback",
        "LAWACallback",
        "MomentumInterpolationCallback",
        "SWACallback",
    ),
    "robustft.callbacks.base": ("RobustCallback",),
    "robustft.callbacks.ema_reference": ("EMAReferenceCallback",),
    "robustft.callbacks.forgetting": ("ForgettingCallback",),
    "robustft.callbacks.lora_arithmetic": ("LoRAArithmeticCallback",),
    "robustft.callbacks.lpft": ("LPFTCallback",),
    "robustft.callbacks.perturbation": (
        "MGPOCallback",
        "MomentumSAMCallback",
        "RandomPerturbationCallback",
    ),
    "robustft.callbacks.plasticity": ("ContinualBackpropCallback", "ShrinkPerturbCallback"),
    "robustft.callbacks.sam": ("SAMCallback",),
    "robustft.callbacks.soup": ("SoupCallback",),
    "robustft.callbacks.sparse": ("SparseUpdateCallback", "load_mask", "save_mask"),
    "robustft.callbacks.wise_ft": ("WiseFTCallback",),
}

#: the callbacks ``robustft`` re-exports at the top: every exported ``...Callback`` but the base class
CALLBACKS: tuple[str, ...] = tuple(
    name for names in EXPORTS.values() for name in names
    if name.endswith("Callback") and name != "RobustCallback"
)

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)

__all__ = sorted(name for names in EXPORTS.values() for name in names)
