"""robustft: robust fine-tuning inside the Hugging Face Trainer.

Weight-space methods as ``TrainerCallback``s: WiSE-FT interpolation, SAM and one-pass weight
perturbations, momentum weight averaging (EMA, SWA, LAWA, momentum interpolation) and exact
LoRA/task-vector arithmetic.
"""

__version__ = "0.1.0"

from robustft.callbacks import (  # noqa: E402
    EMACallback,
    GGPOCallback,
    LAWACallback,
    LoRAArithmeticCallback,
    MomentumInterpolationCallback,
    MomentumSAMCallback,
    RandomPerturbationCallback,
    SAMCallback,
    SWACallback,
    WiseFTCallback,
)
from robustft.lora import (  # noqa: E402
    DeltaSet,
    LoRAAdapter,
    LoRADelta,
    compose_adapters,
    merge_into_base,
    read_adapter,
    write_adapter,
)
from robustft.merge import estimate_fisher, load_recipe, merge_checkpoints  # noqa: E402
from robustft.ops.interpolate import interpolate  # noqa: E402
from robustft.params import Snapshot, select_parameters, swapped_in  # noqa: E402
from robustft.wise_ft import WiseFTCurve, interpolate_models, interpolate_state_dicts, wise_ft_sweep  # noqa: E402
from robustft.zero_shot import SentenceClassifier, install_zero_shot_head  # noqa: E402

__all__ = [
    "DeltaSet",
    "EMACallback",
    "GGPOCallback",
    "LAWACallback",
    "LoRAAdapter",
    "LoRAArithmeticCallback",
    "LoRADelta",
    "MomentumInterpolationCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "SAMCallback",
    "SWACallback",
    "SentenceClassifier",
    "Snapshot",
    "WiseFTCallback",
    "WiseFTCurve",
    "__version__",
    "compose_adapters",
    "estimate_fisher",
    "install_zero_shot_head",
    "interpolate",
    "interpolate_models",
    "interpolate_state_dicts",
    "load_recipe",
    "merge_checkpoints",
    "merge_into_base",
    "read_adapter",
    "select_parameters",
    "swapped_in",
    "wise_ft_sweep",
    "write_adapter",
]
