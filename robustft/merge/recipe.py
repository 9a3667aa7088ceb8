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
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustft.checks import check_integer, check_path, short_repr
from robustft.merge.tokenizer import TokenizerSpec, parse_tokenizer
from robustft.ops.registry import (
    METHODS,
    REQUIRED,
    MethodSpec,
    check_params,
    method_spec,
    resolve_params,
)
from robustft.params import resolve_dtype

__all__ = [
    "METHODS",
    "LayerSlice",
    "MethodSpec",
    "ModelEntry",
    "Override",
    "Recipe",
    "load_recipe",
    "parse_recipe",
]


_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "seed",
    "overrides",
    "tokenizer_source",
    "tokenizer",
    "max_shard_size",
    "slices",
}


@dataclass
class ModelEntry:
    path: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``start`` (inclusive) to ``end`` (exclusive) of the model at ``path`` (a mergekit slice)."""

    path: str
    start: int
    end: int


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
    #: layer stacking (``passthrough`` with mergekit's ``slices``); ``models`` then holds the first slice's
    slices: list[LayerSlice] = field(default_factory=list)

    def resolve(self, override: Override | None = None) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """(method, method-wide parameters, one parameter dict per model) with defaults filled in."""
        method = (override.merge_method if override and override.merge_method else None) or self.merge_method
        layers = [self.parameters, override.parameters if override else {}]
        gparams, mparams = resolve_params(METHODS[method], layers, [m.parameters for m in self.models])
        return method, gparams, mparams

    @property
    def reference_model(self) -> str:
        """The model whose tensor names/shapes, config and tokenizer the output follows."""
        return self.base_model if self.base_model is not None else self.models[0].path


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
        check_path(f"{source}: base_model", base)
    slices = _parse_slices(data, spec, source) if "slices" in data else []
    models_raw = data.get("models") or [{"model": s.path} for s in slices[:1]]
    if not isinstance(models_raw, list):
        raise ValueError(f"{source}: models must be a list of {{model: PATH, parameters: {{...}}}}")
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
        check_path(f"{where}.model", item["model"])
        params = check_params(f"{where}.parameters", item.get("parameters"), spec, allow_global=False)
        models.append(ModelEntry(str(item["model"]), params))
    if base is not None and any(os.path.normpath(m.path) == os.path.normpath(base) for m in models):
        raise ValueError(
            f"{source}: base_model {short_repr(base)} is also listed under models; "
            "list only fine-tuned models"
        )

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
        params = check_params(f"{where}.parameters", item.get("parameters"), ospec, allow_global=True)
        overrides.append(Override(pattern, item.get("merge_method"), params))

    dtype = data.get("dtype")
    if dtype is not None:
        try:
            dtype = resolve_dtype(dtype)
        except ValueError as err:
            raise ValueError(f"{source}: dtype: {err}") from err
        if not dtype.is_floating_point:
            raise ValueError(f"{source}: dtype must be a floating dtype, got {short_repr(data['dtype'])}")
    seed = data.get("seed", 0)
    check_integer(f"{source}: seed", seed)
    tokenizer = parse_tokenizer(data, source)
    if tokenizer is not None and slices:
        raise ValueError(f"{source}: tokenizer_source / tokenizer with slices is not supported yet")
    max_shard_size = data.get("max_shard_size")
    if max_shard_size is not None:
        from robustft.merge.io import parse_size

        parse_size(max_shard_size)

    recipe = Recipe(
        merge_method=spec.name,
        base_model=base,
        models=models,
        parameters=check_params(f"{source}: parameters", data.get("parameters"), spec, allow_global=True),
        dtype=dtype,
        seed=seed,
        overrides=overrides,
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
        raw=dict(data),
        slices=slices,
    )
    # every method in play must get the inputs and required parameters it needs
    for override in [None, *overrides]:
        method, gparams, mparams = recipe.resolve(override)
        where = source if override is None else f"{source}: override {override.pattern.pattern!r}"
        mspec = METHODS[method]
        if mspec.needs_base and base is None:
            raise ValueError(f"{where}: merge_method {method!r} needs base_model")
        if mspec.delta and base is None and gparams.get("lambda", 1.0) != 1.0:
            raise ValueError(f"{where}: lambda scales task vectors ({method!r}): it needs base_model")
        if len(models) < mspec.min_models:
            raise ValueError(
                f"{where}: merge_method {method!r} needs at least {mspec.min_models} model(s) "
                f"under models, got {len(models)}"
            )
        if mspec.max_models is not None and len(models) > mspec.max_models:
            raise ValueError(
                f"{where}: merge_method {method!r} takes at most {mspec.max_models} model(s) "
                f"under models (besides base_model), got {len(models)}"
            )
        for key, value in gparams.items():
            if value is REQUIRED:
                raise ValueError(
                    f"{where}: merge_method {method!r} needs parameter {key!r} (under parameters)"
                )
        for i, values in enumerate(mparams):
            for key, value in values.items():
                if value is REQUIRED:
                    raise ValueError(
                        f"{where}: models[{i}] ({models[i].path}) needs parameter {key!r} "
                        f"for merge_method {method!r}"
                    )
        if mspec.check is not None:
            mspec.check(f"{where}: parameters", gparams, mparams)
    return recipe


def _parse_slices(data: Mapping, spec: MethodSpec, source: str) -> list[LayerSlice]:
    """mergekit's ``slices: [{sources: [{model: PATH, layer_range: [start, end]}]}, ...]`` for
    ``passthrough`` (layer stacking): one source per slice, no models, base_model or overrides beside."""
    where = f"{source}: slices"
    if spec.name != "passthrough":
        raise ValueError(f"{where}: layer slices are supported with merge_method passthrough only")
    clash = sorted(k for k in ("models", "base_model", "overrides") if data.get(k))
    if clash:
        raise ValueError(f"{where}: a recipe with slices takes no {', '.join(clash)}")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: expected a non-empty list of {{sources: [{{model, layer_range}}]}}")
    slices = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping) or set(item) != {"sources"}:
            raise ValueError(f"{at}: expected {{sources: [{{model: PATH, layer_range: [start, end]}}]}}")
        sources = item["sources"]
        if not isinstance(sources, list) or len(sources) != 1:
            raise ValueError(f"{at}.sources: passthrough takes exactly one source per slice")
        src = sources[0]
        if not isinstance(src, Mapping) or set(src) != {"model", "layer_range"}:
            raise ValueError(f"{at}.sources[0]: expected {{model: PATH, layer_range: [start, end]}}")
        check_path(f"{at}.sources[0].model", src["model"])
        rng = src["layer_range"]
        if not (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
            and 0 <= rng[0] < rng[1]
        ):
            raise ValueError(
                f"{at}.sources[0].layer_range: expected [start, end] with 0 <= start < end, "
                f"got {short_repr(rng)}"
            )
        slices.append(LayerSlice(str(src["model"]), rng[0], rng[1]))
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
