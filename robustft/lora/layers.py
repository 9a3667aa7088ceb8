"""The one place that knows how PEFT lays out LoRA: parameter names, saved-adapter keys and live layers.

PEFT (checked with peft 0.21.2) gives a LoRA ``Linear``/``Conv1D`` layer two ``ModuleDict`` s of
``Linear`` factors and an ``Embedding`` layer two ``ParameterDict`` s, so the names are

* in a live model: ``<module>.lora_A.<adapter>.weight`` / ``<module>.lora_embedding_A.<adapter>``
  (B alike), beside ``<module>.base_layer.weight``;
* in a saved adapter (``adapter_model.safetensors``, adapter name removed):
  ``<module>.lora_A.weight`` / ``<module>.lora_embedding_A`` (B alike).

Live layers are recognised by what they hold (``lora_A``, ``lora_B``, ``base_layer``,
``get_delta_weight``), not by class, so PEFT is never imported here.

``target_parameters`` (a ``ParamWrapper`` on an ``nn.Parameter``, e.g. the fused 3-D expert weights of an
MoE, (E, out, in)): one pair of ``Linear`` factors holds every expert, A of shape (E·r, in) expert-major
and B of shape (out, r·E) rank-major, so expert e's delta is s·B[:, e::E] A[e·r:(e+1)·r]. Several parameters
of one module nest their wrappers, the first one PEFT wraps (the module's parameter order) innermost: its
saved keys carry one ``.base_layer`` per wrapper around it (``experts.base_layer.lora_A.weight`` is
``gate_up_proj``,
``experts.lora_A.weight`` is ``down_proj`` on Mixtral). robustft names expert e of such a saved module path
``<path>[e]`` (:func:`expert_name`).
"""

from __future__ import annotations

import re

import torch

from robustft.core import distributed
from robustft.core.params import is_sharded, is_zero3_param, local_tensor, zero3_partition
from robustft.ops.dtypes import compute_dtype

__all__ = [
    "expert_name",
    "is_lora_b",
    "is_peft_model",
    "lora_a_name",
    "lora_delta",
    "lora_layers",
    "low_rank_factors",
    "mentions_lora",
    "join_expert_factors",
    "parse_expert_name",
    "parse_factor_key",
    "split_expert_factors",
    "targets_parameter",
    "wrapped_parameter",
    "unwrapped_module",
]

# a factor's name part, in a live model or a saved adapter: lora_A, lora_B, lora_embedding_A, lora_embedding_B
_B_PART = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")
# a saved adapter's factor key: "<module>.lora_A.weight" (Linear/Conv1D), "<module>.lora_embedding_A", or
# "<module>.lora_B.bias" (lora_bias=True)
_SAVED_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<linear>[AB])\.weight|lora_embedding_(?P<embedding>[AB])|lora_B\.(?P<bias>bias))$"
)


def is_peft_model(model: object) -> bool:
    """True for a PEFT model (``PeftModel``): it has adapters (``peft_config``) and ``disable_adapter()``, the
    context in which it computes the base model's outputs (a transformers model's own adapter mixin has
    ``disable_adapters()`` instead)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def is_lora_b(name: str) -> bool:
    """True for the name of a LoRA B factor (``...lora_B...`` or ``...lora_embedding_B...``)."""
    return _B_PART.search(name) is not None


def lora_a_name(b_name: str) -> str:
    """The name of the A factor that pairs with the B factor ``b_name`` (same module, same adapter)."""
    return _B_PART.sub(lambda m: f"{m[1]}lora_{m[2] or ''}A{m[3]}", b_name)


def parse_factor_key(key: str) -> tuple[str, str, str] | None:
    """(module, ``"A"``/``"B"``/``"bias"``, ``"linear"``/``"embedding"``) of a saved adapter's factor key
    (``"bias"``: the bias of ``lora_B``, PEFT's ``lora_bias=True``), else None."""
    m = _SAVED_FACTOR.match(key)
    if m is None:
        return None
    if m["linear"] is not None:
        return m["module"], m["linear"], "linear"
    if m["bias"] is not None:
        return m["module"], "bias", "linear"
    return m["module"], m["embedding"], "embedding"


_EXPERT = re.compile(r"^(?P<path>.+)\[(?P<expert>\d+)\]$")
_BASE_LAYER = ".base_layer"


def expert_name(path: str, expert: int) -> str:
    """robustft's name of expert ``expert`` of the ``ParamWrapper`` saved under ``path``: ``<path>[e]``."""
    return f"{path}[{expert}]"


def parse_expert_name(name: str) -> tuple[str, int] | None:
    """(saved path, expert) of an :func:`expert_name`, else None."""
    m = _EXPERT.match(name)
    return None if m is None else (m["path"], int(m["expert"]))


def unwrapped_module(path: str) -> tuple[str, int]:
    """(the module a ``ParamWrapper`` saved under ``path`` wraps, how many wrappers lie around it): the
    trailing ``.base_layer`` s removed and counted."""
    depth = 0
    while path.endswith(_BASE_LAYER):
        path, depth = path[: -len(_BASE_LAYER)], depth + 1
    return path, depth


def targets_parameter(key: str, target_parameters) -> bool:
    """PEFT's matching of a parameter's full name to ``target_parameters`` (equal, or a dotted suffix)."""
    return any(key == t or key.endswith(f".{t}") for t in target_parameters)


def wrapped_parameter(model: torch.nn.Module, path: str, target_parameters) -> tuple[str, torch.nn.Parameter]:
    """(name, parameter) of ``model`` that the ``ParamWrapper`` saved under ``path`` adapts: the module's own
    parameters that ``target_parameters`` names, in the module's order, the first innermost."""
    module_name, depth = unwrapped_module(path)
    module = dict(model.named_modules()).get(module_name)
    if module is None:
        raise ValueError(f"LoRA module {path!r}: no module {module_name!r} in the base model")
    targeted = [(n, p) for n, p in module.named_parameters(recurse=False)
                if targets_parameter(f"{module_name}.{n}", target_parameters)]
    if depth >= len(targeted):
        raise ValueError(
            f"LoRA module {path!r}: module {module_name!r} of the base model has {len(targeted)} "
            f"parameter(s) named by target_parameters={list(target_parameters)}, fewer than the "
            "wrappers the key implies"
        )
    name, param = targeted[len(targeted) - 1 - depth]
    return f"{module_name}.{name}", param


def split_expert_factors(B: torch.Tensor, A: torch.Tensor,
                         experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(B_e, A_e)] of a ``ParamWrapper`` 's factors B (out, r·E) rank-major and A (E·r, in) expert-major."""
    rank = A.shape[0] // experts
    a = A.reshape(experts, rank, A.shape[-1])
    b = B.reshape(B.shape[0], rank, experts)
    return [(b[:, :, e].contiguous(), a[e].contiguous()) for e in range(experts)]


def join_expert_factors(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in a ``ParamWrapper`` 's layout from equal-rank per-expert (B_e, A_e): the inverse of
    :func:`split_expert_factors`."""
    B = torch.stack([b for b, _ in pairs], dim=2)  # out x r x E
    A = torch.stack([a for _, a in pairs], dim=0)  # E x r x in
    return B.reshape(B.shape[0], -1), A.reshape(-1, A.shape[-1])


def mentions_lora(key: str) -> bool:
    """True for any key that belongs to a LoRA layer (factors, ``lora_bias``, DoRA magnitudes, ...)."""
    return ".lora_" in key


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers by module name (modules with ``lora_A``/``lora_B``, ``get_delta_weight`` and a
    ``base_layer``)."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A")
        and hasattr(m, "lora_B")
        and hasattr(m, "get_delta_weight")
        and hasattr(m, "base_layer")
    }


def lora_delta(layer: torch.nn.Module, adapter: str) -> torch.Tensor:
    """s·B·A of a PEFT LoRA layer (float32, or wider like the base weight), laid out like ``local_tensor``
    of the base weight W₀.

    FSDP2 shards W₀ (out × in) and B (out × r) along dim 0 alike, so the local rows of B times the whole A
    (gathered: r × in, small) are the local rows of the delta. ZeRO-3: the delta of the gathered factors,
    cut like W₀'s flat partition (a collective).
    """
    b = layer.lora_B[adapter].weight
    base = layer.base_layer.weight
    wide = compute_dtype(base.dtype)
    if is_zero3_param(base):
        with distributed.gathered([layer.lora_A[adapter].weight, b]):
            delta = layer.get_delta_weight(adapter).to(wide)
        offset, length = zero3_partition(base)
        return delta.reshape(-1).narrow(0, offset, length)
    if not is_sharded({"B": b}):
        return layer.get_delta_weight(adapter).to(wide)
    if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(
            "LoRA delta on FSDP2 shards: only plain LoRA Linear layers are supported (not DoRA or "
            "fan_in_fan_out Conv1D); use DDP for this model"
        )
    a = layer.lora_A[adapter].weight.full_tensor()
    return (local_tensor(b).to(wide) @ a.to(wide)) * layer.scaling[adapter]


def low_rank_factors(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(S, A) with S·A = Σ over the active adapters of s·B·A (S: the s·B side by side, out × R; A: the A
    stacked, R × in), so the merged weight W₀ + S·A of a plain LoRA ``Linear`` can be used without forming
    the delta; None where the delta is not that product here: DoRA, fan_in_fan_out (Conv1D), a base layer
    other than ``nn.Linear``, or sharded factors (FSDP2, ZeRO-3: see :func:`lora_delta`)."""
    base = layer.base_layer
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if (not adapters or type(base) is not torch.nn.Linear or getattr(layer, "fan_in_fan_out", False)
            or is_sharded({"W0": base.weight}) or is_zero3_param(base.weight)):
        return None
    scaled, stacked = [], []
    for adapter in adapters:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if getattr(layer, "use_dora", {}).get(adapter, False) or is_sharded({"A": a, "B": b}) or a.dim() != 2:
            return None
        wide = compute_dtype(a.dtype, b.dtype)
        scaled.append(b.detach().to(wide) * layer.scaling[adapter])
        stacked.append(a.detach().to(wide))
    return torch.cat(scaled, dim=1), torch.cat(stacked, dim=0)
