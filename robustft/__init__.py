"""robustft: robust fine-tuning inside the Hugging Face Trainer.

Weight-space methods as ``TrainerCallback``s: WiSE-FT interpolation, SAM and one-pass weight
perturbations, momentum weight averaging (EMA, SWA, LAWA, momentum interpolation) and exact
LoRA/task-vector arithmetic.

The public names below are imported on first use (PEP 562), so ``import robustft`` is cheap and
only what a program touches pulls in torch or transformers (see docs/architecture.md).
"""

from typing import TYPE_CHECKING

from robustft._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from robustft.callbacks import (
        BEMACallback,
        EMACallback,
        EMAReferenceCallback,
        EWCCallback,
        GGPOCallback,
        L2SPCallback,
        LAWACallback,
        LoRAArithmeticCallback,
        LPFTCallback,
        MomentumInterpolationCallback,
        MomentumSAMCallback,
        RandomPerturbationCallback,
        SAMCallback,
        ShrinkPerturbCallback,
        SparseUpdateCallback,
        SpectralRegCallback,
        SWACallback,
        WiseFTCallback,
    )
    from robustft.diagnostics import (
        SharpnessReport,
        layer_sharpness,
        least_critical_module,
        module_criticality,
        plot_sharpness,
        sharpness_along_path,
    )
    from robustft.learned import LearnedInterpolation
    from robustft.lora import (
        DeltaSet,
        LoRAAdapter,
        LoRADelta,
        compose_adapters,
        merge_into_base,
        read_adapter,
        write_adapter,
    )
    from robustft.merge import estimate_fisher, load_recipe, merge_checkpoints
    from robustft.ops.interpolate import interpolate
    from robustft.params import Snapshot, select_parameters, swapped_in
    from robustft.wemoe import fit_wemoe, load_wemoe, save_wemoe, upscale_wemoe
    from robustft.wise_ft import (
        WiseFTCurve,
        dawin_evaluate,
        evaluate_at_alphas,
        interpolate_models,
        interpolate_state_dicts,
        wise_ft_sweep,
    )
    from robustft.zero_shot import SentenceClassifier, install_zero_shot_head

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "robustft.callbacks": (
            "BEMACallback",
            "EMACallback",
            "EMAReferenceCallback",
            "EWCCallback",
            "GGPOCallback",
            "L2SPCallback",
            "LAWACallback",
            "LPFTCallback",
            "LoRAArithmeticCallback",
            "MomentumInterpolationCallback",
            "MomentumSAMCallback",
            "RandomPerturbationCallback",
            "SAMCallback",
            "SWACallback",
            "SpectralRegCallback",
            "ShrinkPerturbCallback",
            "SparseUpdateCallback",
            "WiseFTCallback",
        ),
        "robustft.diagnostics": (
            "SharpnessReport",
            "layer_sharpness",
            "least_critical_module",
            "module_criticality",
            "plot_sharpness",
            "sharpness_along_path",
        ),
        "robustft.learned": ("LearnedInterpolation",),
        "robustft.lora": (
            "DeltaSet",
            "LoRAAdapter",
            "LoRADelta",
            "compose_adapters",
            "merge_into_base",
            "read_adapter",
            "write_adapter",
        ),
        "robustft.merge": ("estimate_fisher", "load_recipe", "merge_checkpoints"),
        "robustft.ops.interpolate": ("interpolate",),
        "robustft.params": ("Snapshot", "select_parameters", "swapped_in"),
        "robustft.wise_ft": (
            "WiseFTCurve",
            "dawin_evaluate",
            "evaluate_at_alphas",
            "interpolate_models",
            "interpolate_state_dicts",
            "wise_ft_sweep",
        ),
        "robustft.wemoe": ("fit_wemoe", "load_wemoe", "save_wemoe", "upscale_wemoe"),
        "robustft.zero_shot": ("SentenceClassifier", "install_zero_shot_head"),
    },
)

__all__ = [
    "BEMACallback",
    "DeltaSet",
    "EMACallback",
    "EMAReferenceCallback",
    "EWCCallback",
    "GGPOCallback",
    "L2SPCallback",
    "LAWACallback",
    "LPFTCallback",
    "LearnedInterpolation",
    "LoRAAdapter",
    "LoRAArithmeticCallback",
    "LoRADelta",
    "MomentumInterpolationCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "SAMCallback",
    "SWACallback",
    "SentenceClassifier",
    "SharpnessReport",
    "ShrinkPerturbCallback",
    "Snapshot",
    "SpectralRegCallback",
    "SparseUpdateCallback",
    "WiseFTCallback",
    "WiseFTCurve",
    "__version__",
    "compose_adapters",
    "dawin_evaluate",
    "estimate_fisher",
    "evaluate_at_alphas",
    "fit_wemoe",
    "install_zero_shot_head",
    "interpolate",
    "interpolate_models",
    "interpolate_state_dicts",
    "layer_sharpness",
    "least_critical_module",
    "load_recipe",
    "load_wemoe",
    "merge_checkpoints",
    "merge_into_base",
    "module_criticality",
    "plot_sharpness",
    "read_adapter",
    "save_wemoe",
    "select_parameters",
    "sharpness_along_path",
    "swapped_in",
    "upscale_wemoe",
    "wise_ft_sweep",
    "write_adapter",
]
