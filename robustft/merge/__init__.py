"""Merging whole checkpoints from a recipe, tensor by tensor, streamed from safetensors to safetensors."""

from robustft.merge.engine import MergeResult, merge_checkpoints, merge_tensor
from robustft.merge.fisher import estimate_fisher, save_fisher
from robustft.merge.recipe import METHODS, Recipe, load_recipe, parse_recipe

__all__ = [
    "METHODS",
    "MergeResult",
    "Recipe",
    "load_recipe",
    "merge_checkpoints",
    "merge_tensor",
    "estimate_fisher",
    "save_fisher",
    "parse_recipe",
]
