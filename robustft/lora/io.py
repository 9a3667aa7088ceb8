"""PEFT LoRA adapters in and out: read ``adapter_config.json`` + ``adapter_model.safetensors`` into
:class:`~robustft.lora.algebra.DeltaSet`, compose them, write an adapter that
``PeftModel.from_pretrained`` loads exactly, or merge it into a dense base model.

Every module of an adapter becomes a :class:`LoRADelta` (B, A, s) with PEFT's own scale
s = lora_alpha / r (lora_alpha / √r with rsLoRA; ``rank_pattern``/``alpha_pattern`` honoured), plus the
bias of ``lora_B`` with ``lora_bias=True``. PEFT LoRA variants whose delta is not s·B·A (DoRA and the other
options PEFT tags as LoRA variants, base-mutating initialisations) are refused, naming the adapter, a
module and the option. Written adapters fold s into B and declare scale 1 for every module
(``lora_alpha = r`` per module through ``rank_pattern``/``alpha_pattern``, no rsLoRA), so ranks may differ
per module and loading is exact.
For embeddings PEFT's ΔW is (B A)ᵀ and for ``fan_in_fan_out`` layers it is stored transposed; the
algebra is the same on the factors, so both are carried through unchanged.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from robustft.checks import check_integer, check_number
from robustft.core.checkpoint import atomic_output_dir, check_output_dir
from robustft.lora.algebra import DeltaSet, LoRADelta, combine, combine_dense
from robustft.lora.layers import mentions_lora, parse_factor_key
from robustft.merge.registry import METHODS, REQUIRED, MergeInputs, tensor_seed

__all__ = [
    "COMPOSE_METHODS",
    "DENSE_METHODS",
    "LoRAAdapter",
    "adapter_from_peft_model",
    "adapter_from_state_dict",
    "check_compatible",
    "check_compose",
    "compose_adapters",
    "merge_into_base",
    "read_adapter",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: per-module relative Frobenius error of a truncated composition, written beside the adapter
TRUNCATION_NAME = "truncation_errors.json"
PREFIX = "base_model.model."


@dataclass
class LoRAAdapter:
    """A LoRA adapter as factors: ``deltas`` (module -> (B, A, s)) plus what is needed to write it back.

    Attributes:
        deltas: module name (as inside the base model) -> :class:`LoRADelta`.
        config: the ``adapter_config.json`` content it came from (a template for writing).
        kinds: module name -> ``"linear"`` or ``"embedding"`` (which PEFT keys to write).
        extras: non-LoRA tensors under their saved keys (``modules_to_save`` heads, saved embeddings).
        dtype: dtype of the stored factors.
        source: where it was read from, for error messages.
        truncation_errors: module -> ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the rank-r truncation that made it (a
            composition with a rank), else empty; written beside the adapter as ``truncation_errors.json``.
    """

    deltas: DeltaSet
    config: dict[str, Any]
    kinds: dict[str, str] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    source: str = "<memory>"
    truncation_errors: dict[str, float] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


# -- reading -----------------------------------------------------------------------------------------
def _module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of ``module``: lora_alpha (or its ``alpha_pattern`` entry, matched by PEFT's own
    ``get_pattern_key``) over r, or over √r with rsLoRA."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


#: ``init_lora_weights`` values that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): such an
#: adapter's ΔW is s·B·A only once PEFT converted it (``path_initial_model_for_weight_conversion``), which
#: saves ``init_lora_weights=True``
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _variant_options(config: Mapping[str, Any]) -> list[str]:
    """The options of ``config`` that make PEFT's ΔW something other than s·B·A (``"use_dora=True"``, ...).

    PEFT tags its LoRA variants in ``LoraConfig``'s field metadata (``is_lora_variant``; the
    ``init_lora_weights`` values in ``lora_variants``): read from there, so new variants are refused too.
    """
    import dataclasses

    from peft import LoraConfig

    found = []
    init = config.get("init_lora_weights", True)
    for f in dataclasses.fields(LoraConfig):
        value = config.get(f.name)
        if f.name == "init_lora_weights":
            variants = (*f.metadata.get("lora_variants", ()), *_BASE_MUTATING_INITS)
            if isinstance(init, str) and init.startswith(variants):
                found.append(f"init_lora_weights={init!r}")
        elif f.metadata.get("is_lora_variant") and value:
            found.append(f"{f.name}={value!r}")
    for name in ("use_qalora", "target_parameters", "layer_replication"):  # not s·B·A on a base module
        if config.get(name):
            found.append(f"{name}={config[name]!r}")
    return found


def adapter_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "<memory>"
) -> LoRAAdapter:
    """Parse a PEFT adapter state dict (keys as in ``adapter_model.safetensors``) and its config.

    The bias of ``lora_B`` (``lora_bias=True``) is carried exactly; a PEFT LoRA variant (DoRA, ...) is
    refused with an error naming ``source``, a module and the option.
    """
    config = {k: _jsonable(v) for k, v in config.items()}
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(
            f"{source}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported"
        )
    factors: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    extras: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        parsed = parse_factor_key(name)
        if parsed is None:
            if mentions_lora(name):
                unknown.append(key)
            else:
                extras[key] = tensor
            continue
        module, factor, kind = parsed
        if factor != "bias":
            kinds[module] = kind
        factors.setdefault(module, {})[factor] = tensor
    variants = _variant_options(config)
    if variants:
        module = min(factors) if factors else (unknown or ["<none>"])[0]
        raise ValueError(
            f"{source}: module {module!r} (and every other module of it) is a PEFT LoRA variant "
            f"({', '.join(variants)}): its ΔW is not s·B·A (DoRA, for one, rescales columns by a learned "
            "magnitude, non-linear in the factors), so no exact combination exists; not supported"
        )
    if unknown:
        raise ValueError(
            f"{source}: tensor {unknown[0]!r} is a LoRA part robustft cannot combine exactly "
            "(a DoRA magnitude or a tuner variant); not supported"
        )
    deltas = DeltaSet()
    dtype = None
    for module, parts in sorted(factors.items()):
        if not {"A", "B"} <= set(parts):
            raise ValueError(
                f"{source}: module {module!r} has only {', '.join(sorted(parts))} of lora_A/lora_B; "
                "the adapter is incomplete"
            )
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(
                f"{source}: module {module!r} has {A.ndim}-D LoRA factors (a convolution?); "
                "only Linear/Conv1D/Embedding LoRA is supported"
            )
        scale = _module_scale(config, module, A.shape[0])
        deltas[module] = LoRADelta(B, A, scale, module, parts.get("bias"))
        dtype = A.dtype if dtype is None else torch.promote_types(dtype, A.dtype)
    if not deltas:
        raise ValueError(f"{source}: no LoRA factors found")
    return LoRAAdapter(deltas, config, kinds, extras, dtype, source)


def read_adapter(path: str | os.PathLike) -> LoRAAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: {path} is not a PEFT adapter saved as safetensors"
            )
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(path)).to_dict()  # PEFT's own reading (any PEFT type)
    return adapter_from_state_dict(load_file(str(path / WEIGHTS_NAME)), config, source=str(path))


def _jsonable(value):
    """Enum -> its value, set -> sorted list (as PEFT writes adapter_config.json)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def adapter_from_peft_model(model, adapter_name: str = "default") -> LoRAAdapter:
    """The adapter ``adapter_name`` of an in-memory ``PeftModel``, as saved by ``save_pretrained``."""
    from peft import get_peft_model_state_dict

    config = {k: _jsonable(v) for k, v in model.peft_config[adapter_name].to_dict().items()}
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # FSDP2 shards are gathered (a collective: every rank reads the adapter, in the same order); a copy,
    # as ZeRO-3 frees gathered data
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in state.items()}
    return adapter_from_state_dict(state, config, source=f"PeftModel adapter {adapter_name!r}")


# -- checking and composing --------------------------------------------------------------------------
def check_compatible(adapters: Sequence[LoRAAdapter]) -> str | None:
    """Refuse adapters of different base models, layouts or shapes; returns the common base model name.

    Modules present in some adapters only are fine (they combine with zero; the union of the target
    modules is written). ``lora_bias`` together with an embedding LoRA is refused (PEFT cannot hold
    both in one adapter). An adapter without
    ``base_model_name_or_path`` is accepted with a warning.
    """
    if not adapters:
        raise ValueError("no adapters given")
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        listing = ", ".join(f"{a.source}: {a.base_model}" for a in adapters)
        raise ValueError(f"adapters of different base models cannot be combined ({listing})")
    if any(not a.base_model for a in adapters):
        warnings.warn(
            "an adapter does not name its base model (base_model_name_or_path); assuming the same base",
            stacklevel=2,
        )
    biased = next((a for a in adapters if any(d.bias is not None for d in a.deltas.values())), None)
    embedding = next(((m, a) for a in adapters for m, k in sorted(a.kinds.items()) if k == "embedding"), None)
    if biased is not None and embedding is not None:
        raise ValueError(
            f"{biased.source} has lora_bias=True but module {embedding[0]!r} of {embedding[1].source} is an "
            "embedding LoRA: PEFT has no lora_bias for embeddings, so no single adapter can hold both"
        )
    fan = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(fan) > 1:
        raise ValueError("adapters disagree on fan_in_fan_out; they were not made for the same model class")
    shapes: dict[str, tuple[tuple[int, int], str, str]] = {}
    for a in adapters:
        for module, d in a.deltas.items():
            kind = a.kinds.get(module, "linear")
            if module not in shapes:
                shapes[module] = (d.shape, kind, a.source)
                continue
            shape, first_kind, first_source = shapes[module]
            if kind != first_kind:
                raise ValueError(
                    f"module {module!r} is a LoRA {first_kind} in {first_source} but a {kind} in {a.source}"
                )
            if d.shape != shape:
                raise ValueError(
                    f"module {module!r}: ΔW shape {shape} in {first_source} but {d.shape} in {a.source}; "
                    "the adapters were not made for the same base model"
                )
    return next(iter(bases), None)


def _combined_extras(adapters: Sequence[LoRAAdapter], extras: str) -> dict[str, torch.Tensor]:
    if extras not in ("same", "first", "drop"):
        raise ValueError(f"extras: unknown policy {extras!r}; expected 'same', 'first' or 'drop'")
    if extras == "drop":
        return {}
    if extras == "first":
        return dict(adapters[0].extras)
    out: dict[str, torch.Tensor] = {}
    for a in adapters:
        for key, t in a.extras.items():
            if key in out and (out[key].shape != t.shape or not torch.equal(out[key], t.to(out[key].dtype))):
                raise ValueError(
                    f"non-LoRA tensor {key!r} (modules_to_save) differs between the adapters and has no "
                    "exact "
                    "combination; pass extras='first' (CLI: --extras first) to keep the first adapter's"
                )
            out.setdefault(key, t)
    return out


#: element-wise merges of the merge-method registry that work on LoRA deltas (each module's dense ΔW_i)
DENSE_METHODS = tuple(name for name, spec in METHODS.items() if spec.lora)
#: all methods of :func:`compose_adapters`
COMPOSE_METHODS = ("exact", "paper", *DENSE_METHODS)
_NOT_LORA_PARAMS = ("weight", "lambda")  # weights are given per adapter; λ would only rescale them


def check_compose(
    method: str,
    weights: Sequence[float] | None,
    params: Mapping[str, Any],
    n: int,
    option: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check a composition before any adapter is read: the method, one finite weight per adapter and the
    method's parameters, by the merge-method registry's own checks (as a merge recipe is). Returns the
    method-wide and per-adapter parameters with the registry's defaults filled in. ``option`` renames
    what errors call the values (the CLI's ``--density``, ``--weights``).
    """
    option = dict(option or {})
    if isinstance(method, str) and method in METHODS and method not in COMPOSE_METHODS:
        raise ValueError(
            f"{option.get('method', 'method')}: merge method {method!r} does not apply to LoRA deltas "
            f"(see docs/lora_arithmetic.md); expected one of {list(COMPOSE_METHODS)}"
        )
    if not isinstance(method, str) or method not in COMPOSE_METHODS:
        raise ValueError(
            f"{option.get('method', 'method')}: unknown method {method!r}; "
            f"expected one of {list(COMPOSE_METHODS)}"
        )
    if weights is not None:
        weights = list(weights)
        if len(weights) != n:
            raise ValueError(f"{option.get('weights', 'weights')}: {len(weights)} weights for {n} adapters")
        for i, w in enumerate(weights):
            check_number(option.get("weights", "weights") + (f"[{i}]" if n > 1 else ""), w)
    params = dict(params)
    if method not in DENSE_METHODS:
        if params:
            raise ValueError(f"method {method!r} takes no parameters, got {sorted(params)}")
        return {}, []
    spec = METHODS[method]
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        most = "" if spec.max_models is None else f" and at most {spec.max_models}"
        raise ValueError(f"method {method!r} takes at least {spec.min_models}{most} adapters, got {n}")
    every = {**spec.global_params, **spec.model_params}
    allowed = {k: p for k, p in every.items() if k not in _NOT_LORA_PARAMS}
    if spec.seeded:
        allowed["seed"] = None
    if "weight" not in spec.model_params and weights is not None and any(w != 1 for w in weights):
        raise ValueError(
            f"method {method!r} takes no per-adapter weights; leave "
            f"{option.get('weights', 'weights')} at 1, got {list(weights)}"
        )
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r}: unknown parameter(s) {unknown}; expected {sorted(allowed)}")
    if spec.seeded and "seed" not in params:
        raise ValueError(f"method {method!r} needs parameter(s) ['seed'] (the seed of the drop masks)")
    missing = sorted(k for k, p in allowed.items() if p and p.default is REQUIRED and k not in params)
    if missing:
        raise ValueError(f"method {method!r} needs parameter(s) {missing}")
    for key, value in params.items():
        name = option.get(key, key)
        check_integer(name, value) if key == "seed" else allowed[key].check(name, value)
    gparams = {k: p.default for k, p in spec.global_params.items()}
    gparams.update({k: v for k, v in params.items() if k in spec.global_params})
    model = {k: p.default for k, p in spec.model_params.items()}
    model.update({k: v for k, v in params.items() if k in spec.model_params})
    if spec.check is not None:
        spec.check(f"method {method!r}", gparams, [model] * n)
    return gparams, [dict(model) for _ in range(n)]


def _dense_merge_fn(method: str, params: Mapping[str, Any], n: int, transposed: set[str]):
    """The registry's tensor function of ``method`` on the modules' dense ΔW_i (a delta, no base), in the
    layout of the base weight (``transposed``: weight names whose B·A is the weight's transpose, embeddings
    and ``fan_in_fan_out`` layers; row-wise rules such as DELLA's ranks depend on it); random methods seed
    each tensor as ``robustft merge`` does (from ``seed`` and ``<module>.weight``/``.bias``)."""

    spec = METHODS[method]
    gparams, mparams = check_compose(method, None, params, n)
    seed = int(params.get("seed", 0))

    def merge(dense: list[torch.Tensor], weights: list[float], name: str) -> torch.Tensor:
        per_model = [{**p, "weight": w} for p, w in zip(mparams, weights, strict=True)]
        flip = name in transposed
        tensors = [t.T for t in dense] if flip else list(dense)
        merged = spec.fn(MergeInputs(tensors, gparams, per_model, tensor_seed(seed, name)))
        return merged.T if flip else merged

    return merge


def compose_adapters(
    adapters: Sequence[LoRAAdapter],
    weights: Sequence[float] | None = None,
    method: str = "exact",
    rank: int | None = None,
    extras: str = "same",
    params: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> LoRAAdapter:
    """ΔW = Σ_i w_i ΔW_i for every module (exact), optionally compressed to ``rank``; see :func:`combine`.

    ``method="paper"`` uses Zhang et al. 2023's factor-space operators instead; the registry's LoRA
    methods (:data:`DENSE_METHODS`: ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"della"``,
    ``"della_linear"``, ``"tsv_m"``, ...) apply their tensor function to each module's dense ΔW_i, one
    module at a time (``params``: their parameters in the merge-method registry, ``robustft.merge.registry``,
    with its defaults and checks, plus ``seed`` for random ones) and keep the best rank-``rank`` factors of
    the result (default rank: the sum of the inputs' largest ranks); LoRA biases are merged by the same
    function. A module missing from an adapter is zero there. The result's ``truncation_errors`` holds,
    per module, ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the rank-r truncation (every dense merge, and ``rank`` given).
    ``extras`` says what to do with non-LoRA tensors (``modules_to_save``): ``"same"`` keeps them if equal
    in every adapter and refuses otherwise, ``"first"`` keeps the first adapter's, ``"drop"`` drops them.
    ``progress``: a tqdm bar over the modules of a dense merge (None: only on a terminal).
    """
    adapters = list(adapters)
    params = dict(params or {})
    check_compose(method, weights, params, len(adapters))
    check_compatible(adapters)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    kinds: dict[str, str] = {}
    for a in adapters:
        kinds.update(a.kinds)
    if method in DENSE_METHODS:
        fan = bool(adapters[0].config.get("fan_in_fan_out"))
        flipped = {f"{m}.weight" for m, k in kinds.items() if fan or k == "embedding"}
        merge_fn = _dense_merge_fn(method, params, len(adapters), flipped)
    kept_extras = _combined_extras(adapters, extras)
    errors: dict[str, float] = {}
    if method in DENSE_METHODS:
        rank = rank or sum(max(d.rank for d in a.deltas.values()) for a in adapters)
        deltas, errors = combine_dense([a.deltas for a in adapters], merge_fn, rank, weights, progress)
    else:
        deltas = combine([a.deltas for a in adapters], weights, method=method)
        if rank is not None:
            errors = {n: d.truncation_error(rank) for n, d in deltas.items()}
            deltas = deltas.compress(rank)
    dtype = adapters[0].dtype
    for a in adapters[1:]:
        dtype = torch.promote_types(dtype, a.dtype)
    config = dict(adapters[0].config)
    config["base_model_name_or_path"] = next((a.base_model for a in adapters if a.base_model), None)
    return LoRAAdapter(deltas, config, kinds, kept_extras, dtype, "<composed>", errors)


# -- writing -----------------------------------------------------------------------------------------


def _adapter_files(
    adapter: LoRAAdapter, dtype: torch.dtype | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, safetensors dict) with scales folded into B and per-module rank patterns."""
    if not adapter.deltas:
        raise ValueError("the adapter has no modules to write")
    dtype = dtype or adapter.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    bias = any(d.bias is not None for d in adapter.deltas.values())
    for module, delta in adapter.deltas.items():
        d = delta.folded()
        ranks[module] = d.rank
        if adapter.kinds.get(module, "linear") == "embedding":
            keys = (f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B")
        else:
            keys = (f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight")
        tensors[keys[0]] = d.A.to(dtype).contiguous()
        tensors[keys[1]] = d.B.to(dtype).contiguous()
        if bias:  # lora_bias is adapter-wide in PEFT: a module without one gets zeros
            if adapter.kinds.get(module, "linear") == "embedding":
                raise ValueError(f"module {module!r}: PEFT has no lora_bias for embeddings; cannot write it")
            b = d.bias if d.bias is not None else torch.zeros(d.shape[0])
            tensors[f"{PREFIX}{module}.lora_B.bias"] = b.to(dtype).contiguous()
    for key, t in adapter.extras.items():
        tensors[key] = t.contiguous()
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    config = dict(adapter.config)
    config.update(
        r=r,
        lora_alpha=r,  # scale lora_alpha / r = 1: the scales are folded into B
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        lora_bias=bias,
        target_modules=sorted(ranks),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        target_parameters=None,
        inference_mode=True,
    )
    return config, tensors


def write_adapter(
    adapter: LoRAAdapter,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``adapter`` as a folder ``PeftModel.from_pretrained`` loads; atomic, overwrites only if asked,
    never over or around one of ``inputs`` (the adapters it was computed from). Its ``truncation_errors``
    (if any) go to ``truncation_errors.json`` in the folder."""
    config, tensors = _adapter_files(adapter, dtype)
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if adapter.truncation_errors:
            errors = json.dumps(adapter.truncation_errors, indent=2, sort_keys=True)
            (tmp / TRUNCATION_NAME).write_text(errors)
    return Path(out_dir)


def _model_class(base_dir: Path, model_class: str | None):
    import transformers

    if model_class is None:
        cfg = (
            json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").is_file() else {}
        )
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(
                f"{base_dir}/config.json names no architectures; pass model_class (CLI: --model-class)"
            )
        model_class = archs[0]
    cls = getattr(transformers, model_class, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ValueError(f"model_class {model_class!r} is not a transformers model class")
    return cls


def merge_into_base(
    adapter: LoRAAdapter,
    base_model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    model_class: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """W = W_base + ΔW for every module, through PEFT's ``merge_and_unload``; saved with ``save_pretrained``.

    The base's weights must be safetensors: a pickle checkpoint (``pytorch_model.bin``) is refused by name and
    never unpickled (loading a pickle can run code). Shapes are checked against the base model before anything
    is written; tokenizer files in
    ``base_model_dir`` are copied along. The output may not be, contain or lie inside the base or ``inputs``.
    """
    from peft import PeftModel

    base_dir = Path(base_model_dir)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"base model folder {base_dir} not found")
    inputs = [base_dir, *inputs]
    out = check_output_dir(out_dir, overwrite, inputs)
    from robustft.merge.io import CheckpointReader

    CheckpointReader(base_dir)  # safetensors weights with sound headers; a pickle is named, never loaded
    model = _model_class(base_dir, model_class).from_pretrained(str(base_dir), use_safetensors=True)
    modules = dict(model.named_modules())
    for module, d in adapter.deltas.items():
        target = modules.get(module)
        weight = getattr(target, "weight", None)
        if weight is None:
            raise ValueError(f"module {module!r} of the adapter is not a weighted module of {base_dir}")
        expected = tuple(weight.shape)
        if adapter.kinds.get(module) == "embedding" or adapter.config.get("fan_in_fan_out"):
            expected = expected[::-1]
        if d.shape != expected:
            raise ValueError(
                f"module {module!r}: adapter ΔW shape {d.shape} does not fit base weight "
                f"{tuple(weight.shape)} in {base_dir}"
            )
        if d.bias is not None and getattr(target, "bias", None) is None:
            raise ValueError(
                f"module {module!r}: the adapter has a LoRA bias (lora_bias) but the base layer in "
                f"{base_dir} has no bias to add it to"
            )
    config, tensors = _adapter_files(adapter, dtype=torch.float32)
    config["base_model_name_or_path"] = str(base_dir)
    with tempfile.TemporaryDirectory() as adir:
        save_file(tensors, os.path.join(adir, WEIGHTS_NAME), metadata={"format": "pt"})
        Path(adir, CONFIG_NAME).write_text(json.dumps(config, default=str))
        merged = PeftModel.from_pretrained(model, adir).merge_and_unload()
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        merged.save_pretrained(str(tmp))
        from robustft.merge.io import copy_side_files

        copy_side_files(None, base_dir, tmp)  # tokenizer files: the same list as merged checkpoints
    return out
