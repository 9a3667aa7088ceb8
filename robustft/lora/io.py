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
A ``target_parameters`` adapter (LoRA on fused MoE experts, PEFT's ``ParamWrapper``) becomes one delta per
expert, named ``<saved path>[e]`` with kind ``"parameter"``, and is written back in PEFT's layout
(:mod:`robustft.lora.layers`).
For embeddings PEFT's ΔW is (B A)ᵀ and for ``fan_in_fan_out`` layers it is stored transposed; the
algebra is the same on the factors, so both are carried through unchanged.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from robustft.core.checkpoint import atomic_output_dir
from robustft.lora.algebra import DeltaSet, LoRADelta
from robustft.lora.layers import (
    expert_name,
    join_expert_factors,
    mentions_lora,
    parse_expert_name,
    parse_factor_key,
    split_expert_factors,
    targets_parameter,
    unwrapped_module,
)

__all__ = [
    "adapter_files",
    "LoRAAdapter",
    "adapter_from_peft_model",
    "adapter_from_state_dict",
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
def _pattern_value(config: Mapping[str, Any], pattern: str, key: str, default):
    """PEFT's value of ``pattern`` (``rank_pattern``/``alpha_pattern``) for ``key``, else ``default``."""
    from peft.utils.other import get_pattern_key

    patterns = config.get(pattern) or {}
    return patterns.get(get_pattern_key(patterns.keys(), key), default)


def _wrapper_rank(config: Mapping[str, Any], path: str, source: str) -> tuple[int, float]:
    """(r, lora_alpha) of the ``ParamWrapper`` saved under ``path``: PEFT looks them up by
    ``<module>.<parameter>``; which parameter a nested wrapper adapts depends on the model's parameter order,
    so patterns that tell the candidates apart are refused."""
    module, _ = unwrapped_module(path)
    names = {t.rpartition(".")[2] for t in config.get("target_parameters") or ()
             if targets_parameter(f"{module}.{t.rpartition('.')[2]}", config["target_parameters"])}
    found = {(_pattern_value(config, "rank_pattern", f"{module}.{n}", config.get("r", 8)),
              _pattern_value(config, "alpha_pattern", f"{module}.{n}", config.get("lora_alpha", 8)))
             for n in sorted(names)}
    if len(found) != 1:
        raise ValueError(
            f"{source}: module {path!r} (target_parameters): rank_pattern/alpha_pattern give its parameters "
            f"{sorted(names)} different ranks or alphas {sorted(found)}, and which nested ParamWrapper "
            "adapts which parameter depends on the model's parameter order; not supported"
        )
    return found.pop()


def _is_wrapper(config: Mapping[str, Any], path: str) -> bool:
    """True when the LoRA module saved under ``path`` is a ``ParamWrapper`` (``target_parameters``)."""
    targets = config.get("target_parameters") or ()
    module, depth = unwrapped_module(path)
    if depth > 0:
        return True
    named = any(targets_parameter(f"{module}.{t.rpartition('.')[2]}", [t]) for t in targets if "." in t)
    if not named and config.get("target_modules") and any("." not in t for t in targets):
        raise ValueError(
            f"module {path!r}: target_parameters {sorted(targets)} names a bare parameter, so a LoRA layer "
            "of target_modules and a ParamWrapper look alike in the saved adapter; not supported"
        )
    return named or any(targets_parameter(f"{module}.{t}", [t]) for t in targets if "." not in t)


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
    for name in ("use_qalora", "layer_replication"):  # not s·B·A on a base module
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
        if kinds[module] == "linear" and _is_wrapper(config, module):
            _add_experts(deltas, kinds, module, parts, config, source)
            dtype = A.dtype if dtype is None else torch.promote_types(dtype, A.dtype)
            continue
        scale = _module_scale(config, module, A.shape[0])
        deltas[module] = LoRADelta(B, A, scale, module, parts.get("bias"))
        dtype = A.dtype if dtype is None else torch.promote_types(dtype, A.dtype)
    if not deltas:
        raise ValueError(f"{source}: no LoRA factors found")
    return LoRAAdapter(deltas, config, kinds, extras, dtype, source)


def _add_experts(deltas: DeltaSet, kinds: dict[str, str], path: str, parts: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any], source: str) -> None:
    """Split the ``ParamWrapper`` saved under ``path`` into one :class:`LoRADelta` per expert, named
    :func:`expert_name` and of kind ``"parameter"``."""
    A, B = parts["A"], parts["B"]
    if "bias" in parts:
        raise ValueError(f"{source}: module {path!r} (target_parameters) has a lora_B bias; PEFT has none")
    rank, alpha = _wrapper_rank(config, path, source)
    experts, rest = divmod(A.shape[0], rank)
    if rest or experts < 1 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"{source}: module {path!r} (target_parameters): factors A {tuple(A.shape)} and "
            f"B {tuple(B.shape)} do not hold r={rank} per expert"
        )
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    del kinds[path]
    for e, (b, a) in enumerate(split_expert_factors(B, A, experts)):
        name = expert_name(path, e)
        deltas[name] = LoRADelta(b, a, scale, name)
        kinds[name] = "parameter"


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
def adapter_files(
    adapter: LoRAAdapter, dtype: torch.dtype | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, safetensors dict) with scales folded into B and per-module rank patterns."""
    if not adapter.deltas:
        raise ValueError("the adapter has no modules to write")
    dtype = dtype or adapter.dtype
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    bias = any(d.bias is not None for d in adapter.deltas.values())
    experts = {m: d for m, d in adapter.deltas.items() if adapter.kinds.get(m) == "parameter"}
    if experts and bias:
        raise ValueError("PEFT has no lora_bias with target_parameters; cannot write both in one adapter")
    wrapper_rank = _write_experts(experts, tensors, dtype)
    for module, delta in adapter.deltas.items():
        if module in experts:
            continue
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
    r = wrapper_rank or max(ranks.values())
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
        target_parameters=sorted(adapter.config.get("target_parameters") or ()) if experts else None,
        inference_mode=True,
    )
    return config, tensors


def _write_experts(experts: Mapping[str, LoRADelta], tensors: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> int:
    """Put the per-expert deltas back into their ``ParamWrapper`` s' factors (scales folded, every expert
    zero-padded to the largest rank among them: exact, PEFT holds one r per wrapper) and return that rank
    (0 without experts)."""
    if not experts:
        return 0
    rank = max(d.rank for d in experts.values())
    groups: dict[str, dict[int, LoRADelta]] = {}
    for name, d in experts.items():
        path, e = parse_expert_name(name)
        groups.setdefault(path, {})[e] = d.folded()
    for path, by_expert in sorted(groups.items()):
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"module {path!r} (target_parameters): experts {sorted(by_expert)}, not 0..E-1")
        pairs = []
        for e in range(len(by_expert)):
            d = by_expert[e]
            pad = rank - d.rank
            pairs.append((torch.nn.functional.pad(d.B, (0, pad)),
                          torch.nn.functional.pad(d.A, (0, 0, 0, pad))))
        B, A = join_expert_factors(pairs)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B.to(dtype).contiguous()
    return rank


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
    config, tensors = adapter_files(adapter, dtype)
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if adapter.truncation_errors:
            errors = json.dumps(adapter.truncation_errors, indent=2, sort_keys=True)
            (tmp / TRUNCATION_NAME).write_text(errors)
    return Path(out_dir)
