"""The merge-method registry: every merge method declared once, read by the recipe parser
(``robustft.merge.recipe``), the merge engine (``robustft.merge.engine``) and ``robustft lora compose``.

A :class:`MethodSpec` says which inputs a method needs (the base, how many models), its parameters with
their checks and defaults (method-wide ``global_params``; ``model_params`` may differ per model), the
tensor function, and whether it works on task vectors (``delta``: the function maps deltas
θ_i − θ_base to a delta, the caller adds λ·τ to the base) and on LoRA deltas (``lora``: usable on the dense
ΔW_i of adapter modules). Adding a method is one :data:`METHODS` entry (plus its tests)::

    MethodSpec("my_rule", _my_rule, needs_base=True, delta=True, lora=True,
               global_params={"lambda": LAMBDA}, model_params={"weight": WEIGHT, "p": Param(0.5, fraction)})

with ``_my_rule(x: MergeInputs) -> Tensor`` (``x.tensors`` are deltas when ``delta`` is true; ``x.gparams``,
``x.mparams``, ``x.weights``, ``x.seed``, ``x.base``; ``x.fishers`` / ``x.grams``: the models' per-tensor
statistics read by the engine for a method declaring ``statistics="fisher"`` / ``"gram"``). Every check
raises a ValueError that
names the option it is about; NaN and ±inf are refused everywhere.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from robustft.checks import (
    check_bool,
    check_count,
    check_density,
    check_drop_rate,
    check_fraction,
    check_non_negative,
    check_number,
    check_path,
    short_repr,
)
from robustft.ops import interpolate as interp
from robustft.ops import merge as ops

__all__ = [
    "LAMBDA",
    "METHODS",
    "MERGEKIT_REFUSED",
    "PARAMETER_NAMES",
    "REQUIRED",
    "WEIGHT",
    "IgnoredParameterWarning",
    "MergeInputs",
    "MethodSpec",
    "Param",
    "check_inputs",
    "check_params",
    "describe_methods",
    "method_spec",
    "resolve_params",
    "tensor_seed",
]


#: default of a parameter every model must give (``fisher``, ``gram``)
REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: its default (or :data:`REQUIRED`) and its check."""

    default: Any
    check: Callable[[str, Any], None]


#: mergekit requires ``weight`` on its weighted methods; robustft's default 1 fills in where mergekit refuses
WEIGHT = Param(1.0, check_number)
LAMBDA = Param(1.0, check_number)
#: mergekit's task-vector methods keep everything by default (density 1.0), their keep fraction in [0, 1]
DENSITY = Param(1.0, check_fraction)
#: mergekit's ``int8_mask``: the dtype of the sign-agreement mask, a memory option with no numerical effect
INT8_MASK = Param(False, check_bool)
#: interpolation position between the base (0) and the model (1); outside [0, 1] needs ``extrapolate``
T = Param(0.5, check_number)
EXTRAPOLATE = Param(False, check_bool)

@dataclass(frozen=True)
class MergeInputs:
    """What a method's tensor function gets for one tensor name, by name instead of by position."""

    #: the models' tensors (task vectors θ_i − θ_base when the method is ``delta``); fresh reads, may be
    #: modified
    tensors: list[torch.Tensor]
    #: method-wide parameters, checked and with defaults filled in
    gparams: dict[str, Any]
    #: per-model parameters, one dict per tensor of ``tensors``
    mparams: list[dict[str, Any]]
    #: the run's seed (random methods draw per tensor from ``tensor_seed(seed, name)``)
    seed: int = 0
    #: the base model's tensor where the method reads it (None for delta methods: they get task vectors)
    base: torch.Tensor | None = None
    #: the models' diagonal Fishers of this tensor (``statistics="fisher"``)
    fishers: Iterable[torch.Tensor] | None = None
    #: the models' mean input Gram matrices of this tensor, read one at a time (``statistics="gram"``); None
    #: for a tensor without Grams (bias, norm, embedding)
    grams: Iterable[torch.Tensor] | None = None

    @property
    def weights(self) -> list[float] | None:
        """The models' ``weight`` parameters, or None for a method without one."""
        return _weights(self.mparams)


#: a method's tensor function: one tensor's inputs -> merged weights (a delta for ``delta`` methods)
MergeFn = Callable[[MergeInputs], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: inputs, parameters (with checks), tensor function, and where it applies.

    ``fn`` gets the models' tensors (task vectors when ``delta``) and returns merged weights (a delta when
    ``delta``; a delta method with ``needs_base=False`` and no base merges the weights themselves, as
    mergekit's spherical methods do). It may modify its inputs in place (they are fresh reads). ``check``
    validates the parameters together, after each one passed its own check. ``seeded``: the method draws
    random masks.
    """

    name: str
    fn: MergeFn | None
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    global_params: dict[str, Param] = field(default_factory=dict)
    model_params: dict[str, Param] = field(default_factory=dict)
    delta: bool = False
    lora: bool = False
    seeded: bool = False
    check: Callable[[str, dict, list[dict]], None] | None = None
    #: the base model is one more input, merged as the models are (mergekit's linear, karcher, passthrough:
    #: their base policy "ignored"); its per-model parameters come last in ``mparams``
    base_input: bool = False
    #: parameter names refused with the reason (a robustft spelling whose meaning mergekit gives another name)
    refused: dict[str, str] = field(default_factory=dict)
    #: per-model statistics the engine reads for each tensor: "fisher" (diagonal Fishers), "gram" (mean input
    #: Gram matrices) or None; they reach ``fn`` as ``MergeInputs.fishers`` / ``MergeInputs.grams``
    statistics: str | None = None

    def apply(
        self,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        gparams: Mapping[str, Any],
        mparams: Sequence[Mapping[str, Any]],
        seed: int = 0,
        statistics: Iterable[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Merged weights of one tensor; delta methods subtract the base and add λ·τ back (in place).
        ``statistics``: the models' statistics of this tensor named by :attr:`statistics` (else ignored)."""
        if self.fn is None:  # "base": keep the base model's tensor
            return base
        if self.base_input and base is not None:  # one more input, last (mergekit appends it)
            tensors = [*tensors, base]
        if not self.delta or (base is None and not self.needs_base):  # optional base: merge the weights
            stats = {"fishers": statistics} if self.statistics == "fisher" else (
                {"grams": statistics} if self.statistics == "gram" else {})
            return self.fn(MergeInputs(tensors, dict(gparams), list(mparams), seed, base, **stats))
        for t in tensors:  # task vectors in place: the tensors are fresh reads and the list is ours
            t.sub_(base)
        delta = self.fn(MergeInputs(tensors, dict(gparams), list(mparams), seed))
        return base.add_(delta, alpha=gparams.get("lambda", 1.0))


def _weights(mparams: Sequence[Mapping[str, Any]]) -> list[float] | None:
    return [p["weight"] for p in mparams] if mparams and "weight" in mparams[0] else None


# -- tensor functions -------------------------------------------------------------------------------------
def _linear(x: MergeInputs) -> torch.Tensor:
    weights = x.weights
    out = ops.task_arithmetic(x.tensors, weights)
    return out.div_(sum(weights)) if x.gparams["normalize"] else out


def _interpolation(kind: str) -> MergeFn:
    fn = interp.FUNCTIONS[kind]
    return lambda x: fn(x.base, x.tensors[0], x.gparams["t"])


def _check_interpolation(where: str, g: dict, m: list[dict]) -> None:
    interp.check_alpha(g["t"], g["extrapolate"], name=f"{where}.t")


def _check_linear(where: str, g: dict, m: list[dict]) -> None:
    if g["normalize"] and sum(p["weight"] for p in m) == 0:
        raise ValueError(f"{where}: linear with normalize: true needs weights with a non-zero sum")


def _task_arithmetic(x: MergeInputs) -> torch.Tensor:
    return ops.combine(x.tensors, x.weights, False, x.gparams["normalize"])


def _ties(x: MergeInputs) -> torch.Tensor:
    # streamed: the merged delta overwrites the first task vector chunk by chunk, no tensor-sized temporary
    out = x.tensors[0] if x.tensors[0].is_contiguous() else None
    density = [p["density"] for p in x.mparams]
    g = x.gparams
    return ops.ties(x.tensors, density, x.weights, out=out, normalize=g["normalize"], rescale=g["rescale"])


def _dare_density(p: Mapping[str, Any]) -> float:
    """The keep probability: ``density`` (mergekit's name), or 1 - ``drop_rate`` (robustft's older alias)."""
    return p["density"] if p.get("drop_rate") is None else 1.0 - p["drop_rate"]


def _check_dare(where: str, g: dict, m: list[dict]) -> None:
    """``drop_rate`` (robustft's alias) beside a ``density`` below 1 is refused: which one means what?"""
    for i, p in enumerate(m):
        if p.get("drop_rate") is not None and p["density"] != 1.0:
            raise ValueError(f"{where}: models[{i}]: {_DROP_RATE_BOTH}")


def _dare(kind: str) -> MergeFn:
    def fn(x: MergeInputs) -> torch.Tensor:
        density = [_dare_density(p) for p in x.mparams]
        g = x.gparams
        return ops.dare_merge(x.tensors, density, x.seed, x.weights, kind, g["rescale"], g["normalize"])

    return fn


def _breadcrumbs(consensus: bool) -> MergeFn:
    def fn(x: MergeInputs) -> torch.Tensor:
        rescale = x.gparams["rescale"]
        pairs = zip(x.tensors, x.mparams, strict=True)
        pruned = [ops.breadcrumbs(d, p["density"], p["gamma"], rescale) for d, p in pairs]
        return ops.combine(pruned, x.weights, consensus, x.gparams["normalize"])

    return fn


def _magnitude_prune(x: MergeInputs) -> torch.Tensor:
    pruned = [ops.magnitude_prune(d, p["density"]) for d, p in zip(x.tensors, x.mparams, strict=True)]
    return ops.task_arithmetic(pruned, x.weights)


def _consensus(x: MergeInputs) -> torch.Tensor:
    return ops.consensus_merge(x.tensors, x.gparams["k"], [p["tall_lambda"] for p in x.mparams], x.weights)


def _model_stock(x: MergeInputs) -> torch.Tensor:
    return ops.model_stock(x.base, x.tensors, x.gparams["filter_wise"])


def _fisher(x: MergeInputs) -> torch.Tensor:
    return ops.fisher_merge(x.tensors, x.fishers, eps=x.gparams["eps"], weights=x.weights)


def _regmean(x: MergeInputs) -> torch.Tensor:
    weights = x.weights
    if x.grams is None:  # no Gram for this tensor (bias, norm, embedding): the weighted mean, as FusionBench
        return ops.task_arithmetic(x.tensors, weights).div_(sum(weights))
    return ops.regmean(x.tensors, x.grams, x.gparams["reduce_non_diagonal_ratio"], weights)


# -- spherical merges of task vectors (robustft.ops.interpolate); base optional: without it, of the weights
def _warp(x: MergeInputs) -> torch.Tensor:
    return interp.slerp_iterated(x.tensors, x.weights)


#: mergekit's nuslerp is linear only where 1 − cos²Ω <= (1e-8)², i.e. for (numerically) colinear vectors
NUSLERP_THRESHOLD = math.sqrt(1.0 - 1e-16)


def _nuslerp(x: MergeInputs) -> torch.Tensor:
    # mergekit: flattened (one angle per tensor) by default; else one angle per vector along the last
    # axis, or along axis 0 with nuslerp_row_wise (mergekit's naming)
    g = x.gparams
    dim = None if g["nuslerp_flatten"] or x.tensors[0].dim() == 0 else (0 if g["nuslerp_row_wise"] else -1)
    return interp.slerp_iterated(x.tensors, x.weights, dim=dim, threshold=NUSLERP_THRESHOLD)


def _multislerp(x: MergeInputs) -> torch.Tensor:
    return interp.multislerp(x.tensors, x.weights, x.gparams["normalize_weights"], x.gparams["eps"])


def _karcher(x: MergeInputs) -> torch.Tensor:
    # mergekit: equal weights over every input, the base (last) included
    return interp.karcher_mean(x.tensors, None, x.gparams["max_iter"], x.gparams["tol"])


def _check_weight_sum(where: str, g: dict, m: list[dict]) -> None:
    if g.get("normalize_weights", True) and sum(p["weight"] for p in m) == 0:
        raise ValueError(f"{where}: the models' weights sum to 0; they cannot be normalized")


def _check_positive(name: str, value: Any) -> None:
    check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {short_repr(value)}")


# -- methods of mergekit 0.1.5 (issue 16): DELLA, Breadcrumbs-TIES, SCE, RAM, NearSwap, Arcee Fusion ---------
def _della(kind: str) -> MergeFn:
    def fn(x: MergeInputs) -> torch.Tensor:
        density, epsilon = [p["density"] for p in x.mparams], [p["epsilon"] for p in x.mparams]
        return ops.della_merge(
            x.tensors, density, epsilon, x.seed, x.weights, kind, rescale=x.gparams["rescale"],
            normalize=x.gparams["normalize"]
        )

    return fn


def _check_della(where: str, g: dict, m: list[dict]) -> None:
    for i, p in enumerate(m):
        d, e = p["density"], p["epsilon"]
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            raise ValueError(
                f"{where}: models[{i}] density +/- epsilon must lie in (0, 1) (density < 1), got {d} +/- {e}"
            )


def _sce(x: MergeInputs) -> torch.Tensor:
    return ops.sce(x.tensors, x.gparams["select_topk"])


def _ram(x: MergeInputs) -> torch.Tensor:
    return ops.ram(x.tensors, x.gparams["epsilon"])


def _ramplus_tl(x: MergeInputs) -> torch.Tensor:
    return ops.ramplus_tl(x.tensors, x.gparams["epsilon"], x.gparams["r"], x.gparams["alpha"])


def _passthrough(x: MergeInputs) -> torch.Tensor:
    scale = x.mparams[0]["scale"]
    return x.tensors[0] if scale is None else x.tensors[0].mul_(scale)


def _check_scale(name: str, value: Any) -> None:
    if value is not None:  # null: the tensor as it is
        check_number(name, value)


def _nearswap(x: MergeInputs) -> torch.Tensor:
    return ops.nearswap(x.base, x.tensors[0], x.gparams["t"])


def _arcee_fusion(x: MergeInputs) -> torch.Tensor:
    return ops.arcee_fusion(x.base, x.tensors[0])


# -- SVD merges of FusionBench (issue 16): TSV-M, Iso-C, Iso-CTS; scale named as FusionBench (alpha,
# scaling_factor), applied here since these methods take no lambda. Iso-C/Iso-CTS give every one of the
# min(m, n) directions the mean singular value: on a low-rank delta (LoRA) that fills the null space with
# directions LAPACK picks arbitrarily, and the flat spectrum has no unique rank-r truncation: not ``lora``
def _tsv_m(x: MergeInputs) -> torch.Tensor:
    return ops.tsv_merge(x.tensors, x.weights, x.gparams["sv_reduction"]).mul_(x.gparams["alpha"])


def _iso_c(x: MergeInputs) -> torch.Tensor:
    return ops.iso_c(x.tensors, x.weights).mul_(x.gparams["scaling_factor"])


def _iso_cts(x: MergeInputs) -> torch.Tensor:
    g = x.gparams
    return ops.iso_cts(x.tensors, g["common_space_fraction"], x.weights).mul_(g["scaling_factor"])


def _check_sv_reduction(name: str, value: Any) -> None:
    if value is not None:  # null: 1/T, the paper's and FusionBench's choice
        check_density(name, value)


def _check_tsv_m(where: str, g: dict, m: list[dict]) -> None:
    f = g["sv_reduction"]
    if f is not None and f * len(m) > 1 + 1e-12:
        raise ValueError(
            f"{where}: sv_reduction x number of models must be <= 1 (the stacked task singular vectors "
            f"must fit in the layer's rank), got {f} x {len(m)}"
        )


_RAM_EPSILON = Param(1e-5, check_non_negative)
_DELTA = {"lambda": LAMBDA}
_INTERPOLATION = {"t": T, "extrapolate": EXTRAPOLATE}
_DROP_RATE_ALIAS = Param(None, lambda name, value: value is None or check_drop_rate(name, value))
_BETA_REFUSED = (
    "robustft's former Breadcrumbs parameter; the method now reads mergekit's: gamma = the fraction of "
    "largest magnitudes dropped (the former beta), density = the fraction kept (the former 1 - beta - gamma)"
)


def _task_vector_spec(
    name: str,
    fn: MergeFn,
    normalize: bool,
    rescale: bool,
    extra: Mapping[str, Param] | None = None,
    **kw: Any,
) -> MethodSpec:
    """One of mergekit's task-vector methods (its ``GeneralizedTaskArithmeticMerge``): method-wide lambda,
    normalize and rescale (defaults per method, as mergekit's registry), int8_mask; per model weight and
    density (1.0), plus the sparsification's own parameter (``extra``)."""
    return MethodSpec(
        name,
        fn,
        needs_base=True,
        global_params={
            **_DELTA,
            "normalize": Param(normalize, check_bool),
            "rescale": Param(rescale, check_bool),
            "int8_mask": INT8_MASK,
        },
        model_params={"weight": WEIGHT, "density": DENSITY, **(extra or {})},
        delta=True,
        **kw,
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("base", None, needs_base=True, min_models=0),
        # -- mergekit 0.1.5's methods: its names, parameters, defaults and meanings --
        MethodSpec(
            "linear",
            _linear,
            needs_base=False,
            global_params={"normalize": Param(True, check_bool)},
            model_params={"weight": WEIGHT},
            check=_check_linear,
            base_input=True,
        ),
        MethodSpec(
            "slerp",
            _interpolation("slerp"),
            needs_base=True,
            max_models=1,
            global_params=_INTERPOLATION,
            check=_check_interpolation,
        ),
        _task_vector_spec("task_arithmetic", _task_arithmetic, normalize=False, rescale=False),
        _task_vector_spec("ties", _ties, normalize=True, rescale=False, lora=True),
        _task_vector_spec(
            "dare_linear",
            _dare("linear"),
            normalize=False,
            rescale=True,
            extra={"drop_rate": _DROP_RATE_ALIAS},
            lora=True,
            seeded=True,
            check=_check_dare,
        ),
        _task_vector_spec(
            "dare_ties",
            _dare("ties"),
            normalize=False,
            rescale=True,
            extra={"drop_rate": _DROP_RATE_ALIAS},
            lora=True,
            seeded=True,
            check=_check_dare,
        ),
        _task_vector_spec(
            "breadcrumbs",
            _breadcrumbs(consensus=False),
            normalize=False,
            rescale=False,
            extra={"gamma": Param(0.01, check_fraction)},
            lora=True,
            refused={"beta": _BETA_REFUSED},
        ),
        _task_vector_spec(
            "breadcrumbs_ties",
            _breadcrumbs(consensus=True),
            normalize=False,
            rescale=False,
            extra={"gamma": Param(0.01, check_fraction)},
            lora=True,
            refused={"beta": _BETA_REFUSED},
        ),
        _task_vector_spec(
            "della",
            _della("ties"),
            normalize=True,
            rescale=True,
            extra={"epsilon": Param(0.15, check_non_negative)},
            lora=True,
            seeded=True,
            check=_check_della,
        ),
        _task_vector_spec(
            "della_linear",
            _della("linear"),
            normalize=False,
            rescale=True,
            extra={"epsilon": Param(0.15, check_non_negative)},
            lora=True,
            seeded=True,
            check=_check_della,
        ),
        MethodSpec(
            "model_stock",
            _model_stock,
            needs_base=True,
            min_models=2,
            global_params={"filter_wise": Param(False, check_bool)},
        ),
        # nuslerp, multislerp: task vectors with a base, else the weights themselves (as mergekit); no lambda
        MethodSpec(
            "nuslerp",
            _nuslerp,
            needs_base=False,
            min_models=2,
            max_models=2,
            global_params={
                "nuslerp_flatten": Param(True, check_bool),
                "nuslerp_row_wise": Param(False, check_bool),
            },
            model_params={"weight": WEIGHT},
            delta=True,
            lora=True,
        ),
        MethodSpec(
            "multislerp",
            _multislerp,
            needs_base=False,
            global_params={
                "normalize_weights": Param(True, check_bool),
                "eps": Param(1e-8, _check_positive),
            },
            model_params={"weight": WEIGHT},
            delta=True,
            lora=True,
            check=_check_weight_sum,
        ),
        # karcher: the equal-weight Karcher mean of every input's weights, the base one more point (mergekit)
        MethodSpec(
            "karcher",
            _karcher,
            needs_base=False,
            global_params={"max_iter": Param(10, check_count), "tol": Param(1e-5, _check_positive)},
            lora=True,
            base_input=True,
        ),
        MethodSpec(
            "sce",
            _sce,
            needs_base=True,
            global_params={"select_topk": Param(1.0, check_fraction), "int8_mask": INT8_MASK},
            delta=True,
            lora=True,
        ),
        MethodSpec(
            "ram", _ram, needs_base=True, global_params={"epsilon": _RAM_EPSILON}, delta=True, lora=True
        ),
        MethodSpec(
            "ramplus_tl",
            _ramplus_tl,
            needs_base=True,
            global_params={
                "epsilon": _RAM_EPSILON,
                "r": Param(0.1, check_number),
                "alpha": Param(0.2, check_non_negative),
            },
            delta=True,
            lora=True,
        ),
        MethodSpec(
            "nearswap",
            _nearswap,
            needs_base=True,
            min_models=1,
            max_models=1,
            global_params={"t": Param(REQUIRED, check_non_negative)},
        ),
        MethodSpec("arcee_fusion", _arcee_fusion, needs_base=True, min_models=1, max_models=1),
        # one input's tensors, optionally scaled; with a base_model, the base is that input (as mergekit)
        MethodSpec(
            "passthrough",
            _passthrough,
            needs_base=False,
            max_models=1,
            model_params={"scale": Param(None, _check_scale)},
            base_input=True,
        ),
        # -- robustft's own methods (mergekit has none of these names) --
        MethodSpec(
            "lerp",
            _interpolation("linear"),
            needs_base=True,
            max_models=1,
            global_params=_INTERPOLATION,
            check=_check_interpolation,
        ),
        MethodSpec(
            "magnitude_prune",
            _magnitude_prune,
            needs_base=True,
            global_params=_DELTA,
            model_params={"weight": WEIGHT, "density": Param(0.2, check_density)},
            delta=True,
            lora=True,
        ),
        MethodSpec(
            "consensus",
            _consensus,
            needs_base=True,
            min_models=2,
            global_params={**_DELTA, "k": Param(2, check_count)},
            model_params={"weight": WEIGHT, "tall_lambda": Param(0.6, check_non_negative)},
            delta=True,
            lora=True,
        ),
        # WARP's spherical merge of task vectors; lambda is LITI's eta: theta_init + eta * tau_merged
        MethodSpec(
            "warp",
            _warp,
            needs_base=False,
            global_params=_DELTA,
            model_params={"weight": WEIGHT},
            delta=True,
            lora=True,
        ),
        MethodSpec(
            "fisher",
            _fisher,
            needs_base=False,
            global_params={"eps": Param(1e-8, check_non_negative)},
            model_params={"weight": WEIGHT, "fisher": Param(REQUIRED, check_path)},
            statistics="fisher",
        ),
        # RegMean: the engine passes each model's mean input Gram of the tensor (a file from save_gram) as
        # the statistics, lazily (MergeInputs.grams), and None for tensors without one
        MethodSpec(
            "regmean",
            _regmean,
            needs_base=False,
            global_params={"reduce_non_diagonal_ratio": Param(1.0, check_fraction)},
            model_params={"weight": Param(1.0, check_non_negative), "gram": Param(REQUIRED, check_path)},
            check=_check_weight_sum,
            statistics="gram",
        ),
        # -- SVD merges of FusionBench (issue 16) --
        MethodSpec(
            "tsv_m",
            _tsv_m,
            needs_base=True,
            global_params={
                "alpha": Param(1.0, check_number),
                "sv_reduction": Param(None, _check_sv_reduction),
            },
            model_params={"weight": WEIGHT},
            delta=True,
            lora=True,
            check=_check_tsv_m,
        ),
        MethodSpec(
            "iso_c",
            _iso_c,
            needs_base=True,
            global_params={"scaling_factor": Param(1.0, check_number)},
            model_params={"weight": WEIGHT},
            delta=True,
        ),
        MethodSpec(
            "iso_cts",
            _iso_cts,
            needs_base=True,
            global_params={
                "scaling_factor": Param(1.0, check_number),
                "common_space_fraction": Param(0.8, check_fraction),
            },
            model_params={"weight": WEIGHT},
            delta=True,
        ),
    ]
}

#: mergekit 0.1.5 merge methods robustft refuses, each with its reason (none today: every method of
#: mergekit's registry is in METHODS with mergekit's meaning; docs/merging.md shows this list)
MERGEKIT_REFUSED: dict[str, str] = {}

#: every parameter name some method reads: a name outside it is a typo (refused), a name in it that the
#: recipe's method does not read is ignored with a warning, as mergekit ignores it
PARAMETER_NAMES = frozenset(
    name for spec in METHODS.values() for name in [*spec.global_params, *spec.model_params]
)


class IgnoredParameterWarning(UserWarning):
    """A recipe sets a parameter the method does not read (mergekit ignores it too): it has no effect."""


def tensor_seed(seed: int, name: str) -> int:
    """Seed for tensor ``name``: stable across runs, machines and tensor order (sha256 of seed and name)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def method_spec(where: str, value: Any) -> MethodSpec:
    """The registered method named ``value`` (a string); else a ValueError naming ``where``, the choices."""
    known = sorted(METHODS)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: expected a method name (a string), got {short_repr(value)} (known: {', '.join(known)})"
        )
    if value not in known:
        raise ValueError(f"{where}: unknown merge method {short_repr(value)} (known: {', '.join(known)})")
    return METHODS[value]


def _default_text(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def describe_methods() -> str:
    """The registry as text (``robustft merge --list``): each method, its inputs, its parameters/defaults."""
    lines = []
    for name in sorted(METHODS):
        spec = METHODS[name]
        models = f"{spec.min_models}+" if spec.max_models is None else f"{spec.min_models}-{spec.max_models}"
        if spec.max_models == spec.min_models:
            models = str(spec.min_models)
        flags = [
            "needs base_model"
            if spec.needs_base
            else (
                "base_model optional: one more input"
                if spec.base_input
                else ("base_model optional" if spec.delta else "no base_model")
            ),
            f"models: {models}",
            "on task vectors" if spec.delta else "on weights",
            f"LoRA deltas: {'yes' if spec.lora else 'no'}",
        ]
        if spec.seeded:
            flags.append("random (seed)")
        lines.append(f"{name}  ({'; '.join(flags)})")
        for label, params in (("method-wide", spec.global_params), ("per model", spec.model_params)):
            if params:
                values = ", ".join(f"{k}={_default_text(p.default)}" for k, p in params.items())
                lines.append(f"    {label}: {values}")
    return "\n".join(lines)


def check_params(where: str, params: Any, spec: MethodSpec, allow_global: bool = True) -> dict[str, Any]:
    """Check a mapping of parameter values against ``spec``: each value its own check; a name the method
    refuses is an error with the reason, a name another method reads is dropped with an
    :class:`IgnoredParameterWarning` (mergekit ignores it too), any other name is an error (a typo)."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(
            f"{where}: expected a mapping of parameter names to values, got {short_repr(params)}"
        )
    known = dict(spec.model_params)
    if allow_global:
        known.update(spec.global_params)
    kept, ignored = {}, []
    for key, value in params.items():
        if key in spec.refused:
            raise ValueError(f"{where}: parameter {key!r} is refused for {spec.name!r}: {spec.refused[key]}")
        if key not in known:
            if key in PARAMETER_NAMES and not (key in spec.global_params and not allow_global):
                ignored.append(key)
                continue
            names = ", ".join(sorted(known)) or "none"
            raise ValueError(
                f"{where}: unknown parameter {short_repr(key)} for merge_method {spec.name!r} "
                f"(known: {names})"
            )
        known[key].check(f"{where}.{key}", value)
        kept[key] = value
    if ignored:
        warnings.warn(
            f"{where}: merge_method {spec.name!r} does not read parameter(s) {sorted(ignored)}: ignored "
            "(as mergekit ignores them)",
            IgnoredParameterWarning,
            stacklevel=2,
        )
    if "drop_rate" in kept and "density" in kept:
        raise ValueError(f"{where}: {_DROP_RATE_BOTH}")
    return kept


_DROP_RATE_BOTH = (
    "give density (mergekit's keep probability) or drop_rate (robustft's older alias for 1 - density), "
    "not both"
)


def check_inputs(where: str, spec: MethodSpec, n_models: int, has_base: bool) -> None:
    """The recipe gives ``spec`` the inputs it takes: a base where it needs one, and a number of models
    within its bounds (for ``base_input`` methods the base counts as one of them, as in mergekit)."""
    if spec.needs_base and not has_base:
        raise ValueError(f"{where}: merge_method {spec.name!r} needs base_model")
    n = n_models + int(spec.base_input and has_base)
    what = (
        "input(s) (models and base_model)"
        if spec.base_input
        else "model(s) under models (besides base_model)"
    )
    if n < spec.min_models or (spec.base_input and n == 0):
        least = max(spec.min_models, 1 if spec.base_input else 0)
        raise ValueError(f"{where}: merge_method {spec.name!r} needs at least {least} {what}, got {n}")
    if spec.max_models is not None and n > spec.max_models:
        raise ValueError(
            f"{where}: merge_method {spec.name!r} takes at most {spec.max_models} {what}, got {n}"
        )


def resolve_params(
    spec: MethodSpec,
    layers: Sequence[Mapping[str, Any]],
    per_model: Sequence[Mapping[str, Any]],
    base: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(method-wide parameters, one dict per model): defaults, then ``layers`` in order (later wins); a
    model's own values (``per_model``) come before the last layer (an override beats them). ``base``: the
    base model's own values where it is an input (``base_input`` methods); its entry comes last, and its
    ``weight`` has no default (mergekit requires one: a base merged at a silent weight 1 is refused)."""
    gparams = {k: p.default for k, p in spec.global_params.items()}
    for layer in layers:
        gparams.update({k: v for k, v in layer.items() if k in spec.global_params})
    owners = list(per_model)
    if spec.base_input and base is not None:
        owners.append(base)
    mparams = []
    for i, own in enumerate(owners):
        values = {k: p.default for k, p in spec.model_params.items()}
        if i == len(per_model) and "weight" in values:
            values["weight"] = REQUIRED
        for layer in [*layers[:1], own, *layers[1:]]:
            values.update({k: v for k, v in layer.items() if k in spec.model_params})
        mparams.append(values)
    return gparams, mparams
