"""robustft: robust fine-tuning inside the Hugging Face Trainer.

Weight-space methods as ``TrainerCallback``s: WiSE-FT interpolation, SAM and one-pass weight
perturbations, momentum weight averaging (EMA, SWA, LAWA, momentum interpolation) and exact
LoRA/task-vector arithmetic.
"""

__version__ = "0.1.0"

from robustft.callbacks.wise_ft import WiseFTCallback  # noqa: E402
from robustft.ops.interpolate import interpolate  # noqa: E402
from robustft.params import Snapshot, select_parameters, swapped_in  # noqa: E402
from robustft.wise_ft import WiseFTCurve, interpolate_models, interpolate_state_dicts, wise_ft_sweep  # noqa: E402
from robustft.zero_shot import SentenceClassifier, install_zero_shot_head  # noqa: E402

__all__ = [
    "SentenceClassifier",
    "Snapshot",
    "WiseFTCallback",
    "WiseFTCurve",
    "__version__",
    "install_zero_shot_head",
    "interpolate",
    "interpolate_models",
    "interpolate_state_dicts",
    "select_parameters",
    "swapped_in",
    "wise_ft_sweep",
]
