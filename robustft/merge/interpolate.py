"""Streamed WiSE-FT / SLERP interpolation of two saved checkpoints into a loadable model folder, and
WARP's merge + LITI step (``warp_checkpoints``): interpolation toward the init, also one merge recipe.

θ(α) = (1−α)·θ_start + α·θ_end (or per-tensor SLERP) is the two-model case of the merge engine: the
recipe ``{merge_method: lerp|slerp, base_model: start, models: [end], parameters: {t: α}}``, streamed
tensor by tensor with the same reader, writer and tensor functions (``robustft.ops.interpolate``), so
a merge recipe, ``robustft interpolate`` and ``robustft.interpolation.wise_ft.interpolate_state_dicts`` give
the same
bits. Every header is checked before anything is written: different tensor names, shapes or dtypes
stop with an error naming the tensor. The output mirrors the end checkpoint's shard layout (and
index), and carries its config and tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from robustft.checks import short_repr
from robustft.merge.engine import MergeResult, merge_checkpoints
from robustft.merge.io import CheckpointReader, layout_difference
from robustft.merge.recipe import Recipe, parse_recipe
from robustft.ops.interpolate import ZERO_SUM, check_alpha, check_method, check_weights

__all__ = [
    "check_policy_weights",
    "check_same_layout",
    "interpolate_checkpoints",
    "interpolation_recipe",
    "warp_checkpoints",
    "warp_recipe",
]


def check_same_layout(
    a: CheckpointReader, b: CheckpointReader, names: tuple[str, str] = ("start", "end")
) -> None:
    """Same tensor names, shapes and dtypes in both checkpoints; else a ValueError naming the tensor."""
    diff = layout_difference(a, b)
    if diff is None:
        return
    if diff.kind == "shape":
        raise ValueError(
            f"tensor {diff.name!r}: shape {diff.ref_value} in {names[0]} but {diff.other_value} in {names[1]}"
        )
    raise ValueError(diff.describe(*names))


def interpolation_recipe(
    start: str | os.PathLike,
    end: str | os.PathLike,
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
) -> Recipe:
    """The merge recipe of θ(α): ``lerp``/``slerp`` with the start as base and the end as the one model."""
    alpha = check_alpha(alpha, extrapolate)
    data = {
        "merge_method": {"linear": "lerp", "slerp": "slerp"}[check_method(method)],
        "base_model": str(start),
        "models": [{"model": str(end)}],
        "parameters": {"t": alpha, "extrapolate": bool(extrapolate)},
    }
    recipe = parse_recipe(data, source="interpolation")
    recipe.tokenizer_source = str(end) if Path(end).is_dir() else None  # the end's files, copied as they are
    return recipe


def interpolate_checkpoints(
    start: str | os.PathLike,
    end: str | os.PathLike,
    out: str | os.PathLike,
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write θ(α) of two checkpoints to ``out`` through the merge engine; returns a summary (tensors, bytes,
    shards). The output follows the end checkpoint: its tensor order, shard files, config and tokenizer."""
    alpha = check_alpha(alpha, extrapolate)
    a, b = CheckpointReader(start), CheckpointReader(end)
    check_same_layout(a, b)
    recipe = interpolation_recipe(start, end, alpha, method, extrapolate)
    info = {
        "start": str(a.path),
        "end": str(b.path),
        "alpha": alpha,
        "method": method,
        "tensors": len(b.names),
        "shards": len(set(i.file for i in b.infos.values())),
        "bytes": b.nbytes(),
    }
    merge_checkpoints(
        recipe,
        out,
        overwrite=overwrite,
        progress=False,
        layout_from=end,
        info_files={"robustft_interpolate.json": json.dumps(info, indent=2)},
    )
    return info


def warp_recipe(
    init: str | os.PathLike,
    policies: list[str | os.PathLike],
    eta: float,
    method: str = "warp",
    weights: list[float] | None = None,
    extrapolate: bool = False,
) -> Recipe:
    """One WARP iteration's merge + LITI as a merge recipe: θ_next = (1−η)·θ_init + η·θ_merged.

    θ_merged is the spherical merge ``method`` (``warp``, ``nuslerp``, ``multislerp``, ``karcher``, or any
    other task-vector method of the registry) of the policies' task vectors θ_m − θ_init, so θ_next =
    θ_init + η·τ_merged: the method with ``lambda: η``. η outside [0, 1] needs ``extrapolate``.
    """
    from robustft.merge.registry import method_spec

    eta = check_alpha(eta, extrapolate, name="eta")
    spec = method_spec("method", method)
    if not spec.delta or "lambda" not in spec.global_params:
        raise ValueError(
            f"method: {method!r} has no lambda (as in mergekit); LITI needs a task-vector method that "
            "scales its merged task vector by lambda (e.g. warp)"
        )
    if weights is not None:
        weights = check_policy_weights(weights, len(policies), extrapolate)
    models = [
        {"model": str(p)} if weights is None else {"model": str(p), "parameters": {"weight": w}}
        for p, w in zip(policies, weights or [None] * len(policies), strict=True)
    ]
    data = {"merge_method": method, "base_model": str(init), "models": models, "parameters": {"lambda": eta}}
    return parse_recipe(data, source="warp")


def check_policy_weights(weights: list[float], n: int, extrapolate: bool = False) -> list[float]:
    """WARP's policy weights as floats: ``n`` of them, each the policy's share of the merge. A negative share
    extrapolates (as η outside [0, 1]) and needs ``extrapolate``; shares summing to 0 say nothing (the
    iterated SLERP's λ_m = w_m / Σ_{k≤m} w_k divides by the sum), so a running sum of 0 after a negative
    weight, or a total of 0, is refused rather than guessed."""
    values = check_weights(weights, n)
    running = [sum(values[: m + 1]) for m in range(n)]
    if abs(running[-1]) < ZERO_SUM or any(
        abs(total) < ZERO_SUM and any(w < 0 for w in values[: m + 1]) for m, total in enumerate(running)
    ):
        raise ValueError(f"weights: {short_repr(weights)} sum to 0 (in total or in the first policies): "
                         "the shares of the merge are undefined")
    if not extrapolate and any(w < 0 for w in values):
        raise ValueError(
            f"weights: {short_repr(weights)} has a negative weight: that extrapolates away from a policy "
            "(λ outside [0, 1]); pass extrapolate=True (CLI: --extrapolate) if this is intended"
        )
    return values


def warp_checkpoints(
    init: str | os.PathLike,
    policies: list[str | os.PathLike],
    out: str | os.PathLike,
    eta: float,
    method: str = "warp",
    weights: list[float] | None = None,
    extrapolate: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Write the next WARP init (:func:`warp_recipe`) to ``out``, streamed by the merge engine; the output
    follows the init checkpoint (tensor names, config, tokenizer)."""
    recipe = warp_recipe(init, policies, eta, method, weights, extrapolate)
    return merge_checkpoints(recipe, out, overwrite=overwrite, progress=progress)
