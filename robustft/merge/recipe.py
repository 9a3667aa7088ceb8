"""YAML merge recipes: schema, defaults and validation (every error names the option it is about).

A recipe reads like mergekit's::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft_math
        parameters: {weight: 1.0, density: 0.3}
      - model: ./ft_code
    parameters: {density: 0.2, lambda: 1.0}   # method-wide values and per-model defaults
    dtype: bfloat16                           # output dtype (default: as stored in the base)
    seed: 0                                   # randomised methods (DARE)
    overrides:                                # per-tensor, by regex searched in the name; first match wins
      - pattern: "embed_tokens|lm_head"
        merge_method: base                    # keep the base model's tensor
      - pattern: "\\.mlp\\."
        parameters: {density: 0.5}

Relative paths are taken relative to the current directory (as mergekit does).

mergekit 0.1.5's grammar is read as mergekit reads it (``robustft.merge.recipe`` is its one home here):
a parameter may be a scalar, a **gradient** list (``t: [0, 0.5, 1]``: spread over each slice's layers,
``evaluate_setting``), a **filter** list (``t: [{filter: self_attn, value: 0.3}, {value: 0.5}]``: the
first entry whose filter is a substring of the tensor name), and ``slices:`` take several sources with
their own ``parameters`` for every method. A model is a local folder or a Hugging Face Hub id (resolved
through the hub cache by ``robustft.merge.io.resolve_model``), ``id@revision`` included.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustft.checks import check_integer, check_path, short_repr
from robustft.core.params import resolve_dtype
from robustft.merge.chat_templates import chat_template_text
from robustft.merge.registry import (
    METHODS,
    REQUIRED,
    IgnoredParameterWarning,
    MethodSpec,
    check_inputs,
    check_params,
    method_spec,
    resolve_params,
)
from robustft.merge.tokenizer import TokenizerSpec, parse_tokenizer

__all__ = [
    "METHODS",
    "Filtered",
    "Gradient",
    "LayerSlice",
    "MethodSpec",
    "ModelEntry",
    "OutputSlice",
    "Override",
    "Recipe",
    "check_resolved",
    "evaluate_setting",
    "is_dynamic",
    "load_recipe",
    "parse_recipe",
    "split_model_ref",
]


_TOP_KEYS = {
    "merge_method",
    "out_dtype",
    "chat_template",
    "tokenizer",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "seed",
    "overrides",
    "tokenizer_source",
    "max_shard_size",
    "slices",
}


# -- mergekit's parameter settings: scalars, gradient lists, filter lists ---------------------------------
#: a key the registry's check_params dropped (a parameter mergekit accepts and ignores)
_DROPPED = object()


@dataclass(frozen=True)
class Gradient:
    """A gradient list (``[0, 0.5, 1]``): numbers are interpolated over a slice's layers, other values
    (booleans, strings) picked, exactly as mergekit's ``evaluate_setting``."""

    values: tuple


@dataclass(frozen=True)
class Filtered:
    """A filter list: ``(filter, setting)`` pairs; the first whose filter is a substring of the tensor name
    (None or ``"*"``: every tensor) gives the value; none matching leaves the parameter unset there."""

    conditions: tuple[tuple[str | None, Any], ...]


def is_dynamic(setting: Any) -> bool:
    """True when a setting's value depends on the tensor (a gradient or a filter list)."""
    return isinstance(setting, (Gradient, Filtered))


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """The value of ``setting`` for tensor ``name`` at layer position ``t`` in [0, 1] (mergekit 0.1.5's
    ``evaluate_setting``: linear interpolation between the two nearest gradient entries; None: unset)."""
    if isinstance(setting, Gradient):
        values = setting.values
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        value = (1 - frac) * values[i0] + frac * values[i1]
        # mergekit validates the result as the parameter's type: an integer parameter takes 10.0 as 10
        ints = all(isinstance(v, int) for v in values)
        return int(value) if ints and float(value).is_integer() else value
    if isinstance(setting, Filtered):
        for filt, value in setting.conditions:
            if filt is None or filt == "*" or (name and filt in name):
                return evaluate_setting(value, name, t)
        return None
    return setting


def evaluate_settings(settings: Mapping[str, Any], name: str, t: float) -> dict[str, Any]:
    """Every setting of a scope evaluated for one tensor; unset ones (no filter matched) left out."""
    out = {}
    for key, setting in settings.items():
        value = evaluate_setting(setting, name, t)
        if value is not None:
            out[key] = value
    return out


def _checked_leaf(where: str, key: str, value: Any, spec: MethodSpec, allow_global: bool) -> bool:
    """Check one scalar of a setting with the registry's check; False if the registry drops the key."""
    if isinstance(value, (list, Mapping)):
        raise ValueError(f"{where}.{key}: expected a value, got {short_repr(value)} (lists do not nest)")
    return key in check_params(where, {key: value}, spec, allow_global=allow_global)


def parse_setting(where: str, key: str, raw: Any, spec: MethodSpec, allow_global: bool) -> Any:
    """A parameter's setting as mergekit reads it (scalar, gradient list, ``{filter, value}`` or a list of
    them), each value checked by the registry; ``_DROPPED`` if the registry drops the key (ignored)."""
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        return raw if _checked_leaf(where, key, raw, spec, allow_global) else _DROPPED
    if not raw:  # mergekit: an empty list sets nothing
        return Filtered(())
    if any(isinstance(v, list) for v in raw):
        raise ValueError(f"{where}.{key}: {short_repr(raw)}: lists do not nest (a gradient is a flat list)")
    if all(not isinstance(v, (list, Mapping)) for v in raw):
        kept = [_checked_leaf(where, key, v, spec, allow_global) for v in raw]
        return Gradient(tuple(raw)) if all(kept) else _DROPPED
    conditions = []
    for i, cond in enumerate(raw):
        at = f"{where}.{key}[{i}]"
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ValueError(
                f"{at}: expected {{filter: SUBSTRING, value: VALUE or [gradient]}} (filter optional), "
                f"got {short_repr(cond)}"
            )
        filt = cond.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise ValueError(
                f"{at}.filter: expected a string (a substring of tensor names), got {short_repr(filt)}"
            )
        value = cond["value"]
        if isinstance(value, Mapping) or (
            isinstance(value, list) and any(isinstance(v, (list, Mapping)) for v in value)
        ):
            raise ValueError(f"{at}.value: expected a value or a gradient list, got {short_repr(value)}")
        value = parse_setting(where, key, value, spec, allow_global)
        if value is _DROPPED:
            return _DROPPED
        conditions.append((filt, value))
    return Filtered(tuple(conditions))


def parse_settings(where: str, params: Any, spec: MethodSpec, allow_global: bool) -> dict[str, Any]:
    """A ``parameters:`` mapping with mergekit's gradients and filters; each value checked by the registry."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(
            f"{where}: expected a mapping of parameter names to values, got {short_repr(params)}"
        )
    out = {}
    for key, raw in params.items():
        setting = parse_setting(where, key, raw, spec, allow_global)
        if setting is not _DROPPED:
            out[key] = setting
    return out


def split_model_ref(where: str, value: Any) -> str:
    """A model reference as mergekit reads it: a folder or a Hub id, ``id@revision`` allowed; ``model+lora``
    (an adapter applied on the fly) is refused by name."""
    check_path(where, value)
    if "+" in value and not os.path.exists(value):
        raise ValueError(
            f"{where}: {short_repr(value)} is mergekit's model+lora form (an adapter merged into the model "
            "before merging), which robustft does not do: merge the adapter first (peft's "
            "merge_and_unload, then save_pretrained) and give that folder"
        )
    if value.count("@") > 1 and not os.path.exists(value):
        raise ValueError(f"{where}: {short_repr(value)} has several '@' (expected MODEL or MODEL@REVISION)")
    return str(value)


@dataclass
class ModelEntry:
    path: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``start`` (inclusive) to ``end`` (exclusive) of the model at ``path`` (a slice source), with
    the source's own parameter settings."""

    path: str
    start: int
    end: int
    parameters: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class OutputSlice:
    """One of mergekit's ``slices:``: its sources (the same number of layers each), an optional base model
    of its own, and slice-wide parameter settings."""

    sources: list[LayerSlice]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class Override:
    pattern: re.Pattern
    merge_method: str | None
    parameters: dict[str, Any]


@dataclass
class Recipe:
    """A validated recipe. ``resolve(override)`` gives (method, global params, per-model params)."""

    merge_method: str
    base_model: str | None
    models: list[ModelEntry]
    parameters: dict[str, Any]
    dtype: Any = None
    seed: int = 0
    overrides: list[Override] = field(default_factory=list)
    #: the folder whose tokenizer files are copied when ``tokenizer`` is None ("base": the reference model)
    tokenizer_source: str | None = "base"
    #: mergekit's ``tokenizer_source`` / ``tokenizer:`` (an output vocabulary; robustft/merge/tokenizer.py)
    tokenizer: TokenizerSpec | None = None
    max_shard_size: int | str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: mergekit's ``slices:`` (layer stacking, and merges of layer ranges with any method); ``models`` is
    #: then empty
    slices: list[OutputSlice] = field(default_factory=list)
    #: the base model's own parameters when it is also listed under ``models`` (mergekit's usual form)
    base_parameters: dict[str, Any] = field(default_factory=dict)
    #: the saved dtype of floating tensors (mergekit's ``out_dtype``; default ``dtype``)
    out_dtype: Any = None
    #: mergekit's ``chat_template``: a template name (chatml, llama3, ...), ``auto`` or a Jinja string
    chat_template: str | None = None

    def resolve(
        self,
        override: Override | None = None,
        name: str = "",
        t: float = 0.0,
        piece: OutputSlice | None = None,
        own: Sequence[tuple[Mapping[str, Any], str]] | None = None,
    ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """(method, method-wide parameters, one parameter dict per model) for tensor ``name`` at layer
        position ``t``, with defaults filled in. Precedence (mergekit's, then robustft's overrides):
        default < recipe ``parameters`` < the slice's < the model's (source's) < the matching override.
        ``own``: each model's settings and its input tensor name (default: ``models``, named ``name``)."""
        method = (override.merge_method if override and override.merge_method else None) or self.merge_method
        first = evaluate_settings(self.parameters, name, t)
        if piece is not None:
            first.update(evaluate_settings(piece.parameters, name, t))
        last = evaluate_settings(override.parameters, name, t) if override else {}
        if own is None:
            own = [(m.parameters, name) for m in self.models]
        per_model = [evaluate_settings(settings, n, t) for settings, n in own]
        base = None
        if piece is None and self.base_model is not None:  # the base listed under models (mergekit's form)
            base = evaluate_settings(self.base_parameters, name, t)
        gparams, mparams = resolve_params(METHODS[method], [first, last], per_model, base)
        return method, gparams, mparams

    def scopes(self) -> list[Mapping[str, Any]]:
        """Every ``parameters`` mapping of the recipe (recipe-wide, models, overrides, slices, sources)."""
        scopes = [
            self.parameters,
            *(m.parameters for m in self.models),
            *(o.parameters for o in self.overrides),
        ]
        for piece in self.slices:
            scopes += [piece.parameters, *(s.parameters for s in piece.sources)]
        return scopes

    @property
    def dynamic(self) -> bool:
        """True when some parameter depends on the tensor (gradients, filters): resolved per tensor."""
        return any(is_dynamic(v) for scope in self.scopes() for v in scope.values())

    @property
    def has_gradients(self) -> bool:
        """True when some parameter is a gradient list (its value depends on the layer's position)."""

        def gradient(setting: Any) -> bool:
            if isinstance(setting, Filtered):
                return any(gradient(value) for _, value in setting.conditions)
            return isinstance(setting, Gradient)

        return any(gradient(v) for scope in self.scopes() for v in scope.values())

    @property
    def reference_model(self) -> str:
        """The model whose tensor names/shapes, config and tokenizer the output follows."""
        if self.base_model is not None:
            return self.base_model
        return self.models[0].path if self.models else self.slices[0].sources[0].path

    def slice_roles(
        self, piece: OutputSlice, method: str | None = None
    ) -> tuple[LayerSlice | None, list[LayerSlice]]:
        """(base source or None, model sources) of a slice: the source that is the slice's base model is
        the base for methods that use one; methods that ignore a base (linear, passthrough) merge every
        source, as mergekit does."""
        spec = METHODS[method or self.merge_method]
        base = piece.base_model or self.base_model
        if base is None or not (spec.needs_base or spec.delta):
            return None, list(piece.sources)
        key = os.path.normpath(base)
        found = [s for s in piece.sources if os.path.normpath(s.path) == key]
        rest = [s for s in piece.sources if os.path.normpath(s.path) != key]
        return (found[0] if found else None), rest


def check_resolved(
    where: str,
    method: str,
    gparams: dict[str, Any],
    mparams: list[dict[str, Any]],
    has_base: bool,
    labels: list[str],
    interpolated: bool = False,
) -> None:
    """Every method in play gets the inputs and required parameters it needs (``labels``: one per model;
    ``mparams`` may hold one more entry, the base's). ``interpolated``: the values were computed from
    gradients, so each is checked again by the registry (an integer parameter between two integers)."""
    mspec = METHODS[method]
    check_inputs(where, mspec, len(labels), has_base)
    if mspec.delta and not has_base and gparams.get("lambda", 1.0) != 1.0:
        raise ValueError(f"{where}: lambda scales task vectors ({method!r}): it needs base_model")
    base_label = "base_model (one more input of it, as in mergekit)"
    labels = [*labels, *([base_label] * (len(mparams) - len(labels)))]
    for key, value in gparams.items():
        if value is REQUIRED:
            raise ValueError(f"{where}: merge_method {method!r} needs parameter {key!r} (under parameters)")
        if interpolated:
            mspec.global_params[key].check(f"{where}: parameters.{key}", value)
    for label, values in zip(labels, mparams, strict=True):
        for key, value in values.items():
            if value is REQUIRED:
                raise ValueError(f"{where}: {label} needs parameter {key!r} for merge_method {method!r}")
            if interpolated:
                mspec.model_params[key].check(f"{where}: {label} parameters.{key}", value)
    if mspec.check is not None:
        mspec.check(f"{where}: parameters", gparams, mparams)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML); raises ValueError naming the offending option."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown} (known: {', '.join(sorted(_TOP_KEYS))})")
    if "merge_method" not in data:
        raise ValueError(f"{source}: merge_method is required (one of {', '.join(sorted(METHODS))})")
    spec = method_spec(f"{source}: merge_method", data["merge_method"])
    if spec.name == "base":
        raise ValueError(f"{source}: merge_method 'base' is only meaningful in overrides")

    base = data.get("base_model")
    if base is not None:
        base = split_model_ref(f"{source}: base_model", base)
    slices = _parse_slices(data, spec, source) if "slices" in data else []
    models_raw = data.get("models") or []
    if not isinstance(models_raw, list):
        raise ValueError(f"{source}: models must be a list of {{model: PATH, parameters: {{...}}}}")
    if not slices and not models_raw:
        raise ValueError(f"{source}: give models (a list of {{model: PATH}}) or slices")
    models = []
    for i, item in enumerate(models_raw):
        where = f"{source}: models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or "model" not in item:
            raise ValueError(
                f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {short_repr(item)}"
            )
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise ValueError(f"{where}: unknown option(s) {extra} (known: model, parameters)")
        path = split_model_ref(f"{where}.model", item["model"])
        params = parse_settings(f"{where}.parameters", item.get("parameters"), spec, allow_global=False)
        models.append(ModelEntry(path, params))
    models, base_parameters = _split_base(models, base, spec, source)

    overrides = []
    for i, item in enumerate(data.get("overrides") or []):
        where = f"{source}: overrides[{i}]"
        if not isinstance(item, Mapping) or "pattern" not in item:
            raise ValueError(f"{where}: expected {{pattern: REGEX, merge_method: ..., parameters: {{...}}}}")
        extra = sorted(set(item) - {"pattern", "merge_method", "parameters"})
        if extra:
            raise ValueError(f"{where}: unknown option(s) {extra} (known: pattern, merge_method, parameters)")
        try:
            pattern = re.compile(str(item["pattern"]))
        except re.error as err:
            raise ValueError(
                f"{where}.pattern: {short_repr(item['pattern'])} is not a valid regular expression ({err})"
            ) from err
        ospec = method_spec(f"{where}.merge_method", item["merge_method"]) if "merge_method" in item else spec
        params = parse_settings(f"{where}.parameters", item.get("parameters"), ospec, allow_global=True)
        overrides.append(Override(pattern, item.get("merge_method"), params))

    dtype = _floating_dtype(source, "dtype", data.get("dtype"))
    out_dtype = _floating_dtype(source, "out_dtype", data.get("out_dtype"))
    seed = data.get("seed", 0)
    check_integer(f"{source}: seed", seed)
    tokenizer = parse_tokenizer(data, source)
    chat_template = data.get("chat_template")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise ValueError(f"{source}: chat_template: expected a template name or a Jinja string, "
                             f"got {short_repr(chat_template)}")  # fmt: skip
        try:
            chat_template_text(chat_template)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    max_shard_size = data.get("max_shard_size")
    if max_shard_size is not None:
        from robustft.merge.io import parse_size

        parse_size(max_shard_size)

    recipe = Recipe(
        merge_method=spec.name,
        base_model=base,
        models=models,
        parameters=parse_settings(f"{source}: parameters", data.get("parameters"), spec, allow_global=True),
        dtype=dtype,
        seed=seed,
        overrides=overrides,
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
        raw=dict(data),
        slices=slices,
        base_parameters=base_parameters,
        out_dtype=out_dtype,
        chat_template=chat_template,
    )
    # every method in play must get the inputs and required parameters it needs; parameters that depend
    # on the tensor (gradients, filters) are checked again for every tensor by the engine
    for override in [None, *overrides]:
        where = source if override is None else f"{source}: override {override.pattern.pattern!r}"
        groups: list[tuple[str, OutputSlice | None, bool, list[tuple[Mapping, str]], list[str]]] = []
        if not slices:
            labels = [f"models[{i}] ({m.path})" for i, m in enumerate(models)]
            groups.append((where, None, base is not None, [(m.parameters, "") for m in models], labels))
        method = (override.merge_method if override and override.merge_method else None) or spec.name
        if slices and method in ("fisher", "regmean"):
            raise ValueError(f"{where}: merge_method {method!r} (statistics files) does not take slices")
        for k, piece in enumerate(slices):
            at = f"{where}: slices[{k}]"
            sbase, rest = recipe.slice_roles(piece, method)
            _check_slice_base(at, recipe, piece, method)
            labels = [f"source {s.path}" for s in rest]
            groups.append((at, piece, sbase is not None, [(s.parameters, "") for s in rest], labels))
        for at, piece, has_base, own, labels in groups:
            method, gparams, mparams = recipe.resolve(override, piece=piece, own=own)
            if recipe.dynamic:  # the inputs only; the values per tensor, in the engine
                _structure_only(at, method, len(own), has_base)
            else:
                check_resolved(at, method, gparams, mparams, has_base, labels)
    return recipe


def _structure_only(where: str, method: str, n_models: int, has_base: bool) -> None:
    """The inputs a method needs (base, model counts), checked before the values are known per tensor."""
    check_inputs(where, METHODS[method], n_models, has_base)


def _split_base(
    models: list[ModelEntry], base: str | None, spec: MethodSpec, source: str
) -> tuple[list[ModelEntry], dict[str, Any]]:
    """(the models without the base, the base entry's parameters): mergekit's usual form lists the base
    under ``models`` too; it is one input, merged as the base (its parameters read only by methods that
    take the base as an input, such as linear's weight)."""
    if base is None:
        return models, {}
    same = [i for i, m in enumerate(models) if os.path.normpath(m.path) == os.path.normpath(base)]
    if len(same) > 1:
        raise ValueError(f"{source}: base_model {short_repr(base)} is listed {len(same)} times under models")
    if not same:
        return models, {}
    params = models[same[0]].parameters
    if params and not spec.base_input:
        warnings.warn(
            f"{source}: models[{same[0]}] is the base_model; {spec.name!r} does not merge the base as a "
            f"model, so its parameters {sorted(params)} are ignored (as mergekit ignores them)",
            IgnoredParameterWarning,
            stacklevel=3,
        )
    return [m for i, m in enumerate(models) if i != same[0]], dict(params)


def _check_slice_base(where: str, recipe: Recipe, piece: OutputSlice, method: str) -> None:
    """mergekit: a slice's base model (its own or the recipe's) must be one of its sources."""
    spec = METHODS[method]
    base = piece.base_model or recipe.base_model
    if base is None or not (spec.needs_base or spec.delta):
        return
    if recipe.slice_roles(piece, method)[0] is None:
        raise ValueError(
            f"{where}: base model {short_repr(base)} is not one of the slice's sources "
            "(mergekit: list the base among each slice's sources)"
        )


def _floating_dtype(source: str, key: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        dtype = resolve_dtype(value)
    except ValueError as err:
        raise ValueError(f"{source}: {key}: {err}") from err
    if not dtype.is_floating_point:
        raise ValueError(f"{source}: {key} must be a floating dtype, got {short_repr(value)}")
    return dtype


def _parse_slices(data: Mapping, spec: MethodSpec, source: str) -> list[OutputSlice]:
    """mergekit's ``slices: [{sources: [{model, layer_range: [start, end], parameters}], base_model,
    parameters}, ...]``: each slice's sources have the same number of layers; no ``models`` beside."""
    where = f"{source}: slices"
    if data.get("models"):
        raise ValueError(f"{where}: a recipe with slices takes no models (mergekit: one of models, slices)")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: expected a non-empty list of {{sources: [{{model, layer_range}}]}}")
    slices = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping) or "sources" not in item:
            raise ValueError(f"{at}: expected {{sources: [{{model: PATH, layer_range: [start, end]}}]}}")
        extra = sorted(set(item) - {"sources", "base_model", "parameters", "residual_weight"})
        if extra:
            raise ValueError(f"{at}: unknown option(s) {extra} (known: sources, base_model, parameters)")
        if "residual_weight" in item:  # mergekit parses it and never reads it
            warnings.warn(f"{at}.residual_weight is ignored (as mergekit 0.1.5 ignores it)", stacklevel=3)
        sources = item["sources"]
        if not isinstance(sources, list) or not sources:
            raise ValueError(f"{at}.sources: expected a non-empty list of {{model, layer_range}}")
        parsed = []
        for j, src in enumerate(sources):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, Mapping) or not {"model", "layer_range"} <= set(src):
                raise ValueError(f"{sat}: expected {{model: PATH, layer_range: [start, end]}}")
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise ValueError(f"{sat}: unknown option(s) {extra} (known: model, layer_range, parameters)")
            path = split_model_ref(f"{sat}.model", src["model"])
            rng = src["layer_range"]
            if not (
                isinstance(rng, list)
                and len(rng) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                and 0 <= rng[0] < rng[1]
            ):
                raise ValueError(
                    f"{sat}.layer_range: expected [start, end] with 0 <= start < end, got {short_repr(rng)}"
                )
            params = parse_settings(f"{sat}.parameters", src.get("parameters"), spec, allow_global=False)
            parsed.append(LayerSlice(path, rng[0], rng[1], params))
        lengths = {s.end - s.start for s in parsed}
        if len(lengths) > 1:
            raise ValueError(f"{at}.sources: every source must span the same number of layers "
                             f"(as mergekit), got {sorted(lengths)}")  # fmt: skip
        sbase = item.get("base_model")
        if sbase is not None:
            sbase = split_model_ref(f"{at}.base_model", sbase)
        params = parse_settings(f"{at}.parameters", item.get("parameters"), spec, allow_global=True)
        slices.append(OutputSlice(parsed, sbase, params))
    return slices


MAX_YAML_NODES = 100_000  # a recipe of hundreds of models and overrides stays far below


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Number of nodes ``node`` stands for once every alias is expanded (memoised: linear in the file)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ValueError("a recursive alias (an anchor used inside itself)")
    open_.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _expanded_nodes(child, sizes, open_)
        if total > MAX_YAML_NODES:
            break
    open_.discard(key)
    sizes[key] = total
    return total


def safe_load_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses documents whose aliases expand beyond ``MAX_YAML_NODES`` nodes (a
    "billion laughs" bomb would otherwise explode in every consumer that walks or prints the data)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_nodes(node, {}, set())
        except ValueError as err:
            raise ValueError(f"{source}: {err} is not allowed") from None
        if size > MAX_YAML_NODES:
            raise ValueError(
                f"{source}: the YAML expands to more than {MAX_YAML_NODES} values through its aliases "
                "(&anchor / *alias); a recipe needs far fewer: write the values out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe (safe YAML, aliases bounded: ``safe_load_bounded``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        data = safe_load_bounded(path.read_text(), f"recipe {path}")
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: invalid YAML ({err})") from err
    except RecursionError:
        raise ValueError(f"recipe {path}: the YAML is nested too deeply") from None
    return parse_recipe(data, source=str(path))
