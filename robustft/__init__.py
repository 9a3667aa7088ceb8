"""robustft: robust fine-tuning inside the Hugging Face Trainer.

Weight-space methods as ``TrainerCallback``s: WiSE-FT interpolation, SAM and one-pass weight
perturbations, momentum weight averaging (EMA, SWA, LAWA, momentum interpolation) and exact
LoRA/task-vector arithmetic.
"""

__version__ = "0.1.0"

from robustft.callbacks.sam import (  # noqa: E402
    GGPOCallback,
    MomentumSAMCallback,
    RandomPerturbationCallback,
    SAMCallback,
)
from robustft.params import Snapshot, select_parameters, swapped_in  # noqa: E402

__all__ = [
    "GGPOCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "SAMCallback",
    "Snapshot",
    "__version__",
    "select_parameters",
    "swapped_in",
]
