"""robustft: robust fine-tuning inside the Hugging Face Trainer.

Weight-space methods as ``TrainerCallback``s: WiSE-FT interpolation, SAM and one-pass weight
perturbations, momentum weight averaging (EMA, SWA, LAWA, momentum interpolation) and exact
LoRA/task-vector arithmetic.

The public names below are imported on first use (PEP 562), so ``import robustft`` is cheap and
only what a program touches pulls in torch or transformers (see docs/architecture.md).
"""

from typing import TYPE_CHECKING

from robustft._lazy import lazy_exports
from robustft.callbacks import CALLBACKS

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from robustft.analysis.barrier import BarrierReport, barrier_report
    from robustft.analysis.retention import (
        RetentionScores,
        RetentionSet,
        build_retention_set,
        general_prompts,
        score_retention,
    )
    from robustft.analysis.sharpness import (
        SharpnessReport,
        layer_sharpness,
        least_critical_module,
        module_criticality,
        plot_sharpness,
        sharpness_along_path,
        straggler_layers,
        treat_stragglers,
    )
    from robustft.analysis.strength import StrengthCurve, strength_sweep
    from robustft.callbacks import *  # noqa: F403 (every name of robustft.callbacks.CALLBACKS)
    from robustft.core.params import Snapshot, select_parameters, swapped_in
    from robustft.demos.zero_shot import SentenceClassifier, install_zero_shot_head
    from robustft.interpolation.dawin import dawin_evaluate
    from robustft.interpolation.learned import LearnedInterpolation
    from robustft.interpolation.soup import SoupResult, soup_model, trainer_scorer, write_uniform_soup
    from robustft.interpolation.wemoe import fit_wemoe, load_wemoe, save_wemoe, upscale_wemoe
    from robustft.interpolation.wise_ft import (
        AlphaBudget,
        WiseFTCurve,
        evaluate_at_alphas,
        interpolate_models,
        interpolate_state_dicts,
        wise_ft_sweep,
    )
    from robustft.lora import (
        DeltaSet,
        LoRAAdapter,
        LoRADelta,
        compose_adapters,
        merge_into_base,
        read_adapter,
        write_adapter,
    )
    from robustft.merge import estimate_fisher, load_recipe, merge_checkpoints, search_merge
    from robustft.ops.interpolate import interpolate

#: module -> the public names ``robustft`` re-exports from it; ``__all__`` and the lazy look-up derive from it
#: (a new callback is registered in ``robustft.callbacks.EXPORTS`` only)
EXPORTS: dict[str, tuple[str, ...]] = {
    "robustft.callbacks": CALLBACKS,
    "robustft.analysis.barrier": ("BarrierReport", "barrier_report"),
    "robustft.analysis.retention": (
        "RetentionScores",
        "RetentionSet",
        "build_retention_set",
        "general_prompts",
        "score_retention",
    ),
    "robustft.analysis.sharpness": (
        "SharpnessReport",
        "layer_sharpness",
        "least_critical_module",
        "module_criticality",
        "plot_sharpness",
        "sharpness_along_path",
        "straggler_layers",
        "treat_stragglers",
    ),
    "robustft.analysis.strength": ("StrengthCurve", "strength_sweep"),
    "robustft.interpolation.learned": ("LearnedInterpolation",),
    "robustft.interpolation.soup": ("SoupResult", "soup_model", "trainer_scorer", "write_uniform_soup"),
    "robustft.lora": (
        "DeltaSet",
        "LoRAAdapter",
        "LoRADelta",
        "compose_adapters",
        "merge_into_base",
        "read_adapter",
        "write_adapter",
    ),
    "robustft.merge": ("estimate_fisher", "load_recipe", "merge_checkpoints", "search_merge"),
    "robustft.ops.interpolate": ("interpolate",),
    "robustft.core.params": ("Snapshot", "select_parameters", "swapped_in"),
    "robustft.interpolation.dawin": ("dawin_evaluate",),
    "robustft.interpolation.wise_ft": (
        "AlphaBudget",
        "WiseFTCurve",
        "evaluate_at_alphas",
        "interpolate_models",
        "interpolate_state_dicts",
        "wise_ft_sweep",
    ),
    "robustft.interpolation.wemoe": ("fit_wemoe", "load_wemoe", "save_wemoe", "upscale_wemoe"),
    "robustft.demos.zero_shot": ("SentenceClassifier", "install_zero_shot_head"),
}

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)

__all__ = sorted({"__version__", *(name for names in EXPORTS.values() for name in names)})
