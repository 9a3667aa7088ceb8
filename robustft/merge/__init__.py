"""Merging whole checkpoints from a recipe, tensor by tensor, streamed from safetensors to safetensors.

The names below are imported on first use (PEP 562): ``import robustft.merge`` alone imports nothing
heavy, and ``robustft merge --help`` answers without torch.
"""

from typing import TYPE_CHECKING

from robustft._lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from robustft.core.statistics import Grams, estimate_fisher, estimate_gram, save_fisher, save_gram
    from robustft.merge.align import (
        AlignResult,
        activation_matching,
        align_checkpoints,
        align_models,
        align_state_dicts,
    )
    from robustft.merge.engine import MergeResult, merge_checkpoints, merge_tensor
    from robustft.merge.experts import ExpertMergeReport, merge_experts
    from robustft.merge.interpolate import warp_checkpoints
    from robustft.merge.recipe import METHODS, Recipe, load_recipe, parse_recipe
    from robustft.merge.search import SearchParam, SearchResult, search_merge, trainer_objective
    from robustft.merge.tall import TallResult, tall_compress_checkpoints, tall_extract

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "robustft.merge.align": (
            "AlignResult", "activation_matching", "align_checkpoints", "align_models", "align_state_dicts",
        ),
        "robustft.merge.engine": ("MergeResult", "merge_checkpoints", "merge_tensor"),
        "robustft.merge.experts": ("ExpertMergeReport", "merge_experts"),
        "robustft.core.statistics": ("Grams", "estimate_fisher", "estimate_gram", "save_fisher", "save_gram"),
        "robustft.merge.interpolate": ("warp_checkpoints",),
        "robustft.merge.recipe": ("METHODS", "Recipe", "load_recipe", "parse_recipe"),
        "robustft.merge.search": ("SearchParam", "SearchResult", "search_merge", "trainer_objective"),
        "robustft.merge.tall": ("TallResult", "tall_compress_checkpoints", "tall_extract"),
    },
)

__all__ = [
    "AlignResult",
    "activation_matching",
    "align_checkpoints",
    "align_models",
    "align_state_dicts",
    "ExpertMergeReport",
    "METHODS",
    "MergeResult",
    "merge_experts",
    "Recipe",
    "load_recipe",
    "merge_checkpoints",
    "merge_tensor",
    "estimate_fisher",
    "estimate_gram",
    "Grams",
    "save_fisher",
    "save_gram",
    "parse_recipe",
    "SearchParam",
    "SearchResult",
    "search_merge",
    "trainer_objective",
    "TallResult",
    "tall_compress_checkpoints",
    "tall_extract",
    "warp_checkpoints",
]
