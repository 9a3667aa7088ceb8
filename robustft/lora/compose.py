"""Composing LoRA adapters: exact low-rank sums (``exact``, ``paper``), the registry's dense merges refactored
to rank r (``DENSE_METHODS``), and merging an adapter into its base model's weights. Reading and writing
adapters is :mod:`robustft.lora.io`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from robustft.checks import check_integer, check_number
from robustft.core.checkpoint import atomic_output_dir, check_output_dir
from robustft.lora.algebra import combine, combine_dense
from robustft.lora.io import CONFIG_NAME, WEIGHTS_NAME, LoRAAdapter, adapter_files
from robustft.lora.layers import parse_expert_name, unwrapped_module, wrapped_parameter
from robustft.merge.registry import METHODS, REQUIRED, MergeInputs, tensor_seed

__all__ = ["COMPOSE_METHODS", "DENSE_METHODS", "check_compatible", "check_compose", "compose_adapters",
           "load_model_class", "merge_into_base"]


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
    targets = {a.source: sorted(a.config.get("target_parameters") or ()) for a in adapters
               if a.config.get("target_parameters")}
    if len({tuple(t) for t in targets.values()}) > 1:
        raise ValueError(
            f"adapters target different parameters (target_parameters: {targets}): a nested ParamWrapper's "
            "saved name depends on which parameters are targeted, so they cannot be combined"
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


def load_model_class(base_dir: str | os.PathLike, model_class: str | None = None):
    """The transformers class of a model folder: ``model_class`` by name, else its first architecture."""
    base_dir = Path(base_dir)
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


def _quantization(base_dir: Path) -> dict | None:
    """The ``quantization_config`` of ``base_dir/config.json`` (a quantized base), else None."""
    path = base_dir / "config.json"
    config = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return config if isinstance(config, dict) else None


def _load_base(base_dir: Path, model_class: str | None):
    """(the base model, the dtype to save the merge in, or None to keep the base's own).

    A bitsandbytes 4-bit/8-bit base is loaded on CPU and dequantized to float32 (transformers'
    ``dequantize``): the adapter is then added to exactly the weights it was trained against, in full
    precision, instead of to the quantized layer, which would re-quantize W + ΔW and round most of the
    adapter's small ΔW away (peft#2105, transformers#31293). The merge is saved in the base's dtype: the wider
    of its 4-bit compute dtype and the dtype of its unquantized weights (LLM.int8() computes in the latter).
    """
    cls = load_model_class(base_dir, model_class)
    quant = _quantization(base_dir)
    if quant is None:
        return cls.from_pretrained(str(base_dir), use_safetensors=True), None
    method = quant.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(
            f"{base_dir} is quantized with {method!r} (config.json quantization_config); robustft "
            "dequantizes only bitsandbytes 4-bit/8-bit bases before a merge"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"{base_dir} is a bitsandbytes-quantized base (config.json quantization_config): install "
            "bitsandbytes (pip install 'robustft[qlora]') to dequantize it for the merge"
        )
    model = cls.from_pretrained(str(base_dir), use_safetensors=True, device_map="cpu")
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    compute = quant.get("bnb_4bit_compute_dtype") if quant.get("load_in_4bit") else None
    if isinstance(compute, str):
        compute = getattr(torch, compute.removeprefix("torch."), None)
    if isinstance(compute, torch.dtype):
        dtype = torch.promote_types(dtype, compute)
    return model.dequantize(dtype=torch.float32), dtype


def _check_expert(model, name: str, shape: tuple[int, int], target_parameters, base_dir: Path) -> None:
    """Refuse an expert delta ``name`` (``<path>[e]``) that does not fit the base parameter it adapts."""
    path, expert = parse_expert_name(name)
    pname, param = wrapped_parameter(model, path, target_parameters)
    if param.dim() == 2:
        experts, expected = 1, tuple(param.shape)
    else:
        experts, expected = param.shape[0], tuple(param.shape[1:])
        owner = dict(model.named_modules())[unwrapped_module(path)[0]]
        if getattr(owner, "is_transposed", False):  # (E, in, out) storage: PEFT's ΔW is transposed there
            expected = expected[::-1]
    if expert >= experts or shape != expected:
        raise ValueError(
            f"module {name!r}: adapter ΔW of shape {shape} for expert {expert} does not fit parameter "
            f"{pname!r} {tuple(param.shape)} in {base_dir}"
        )


def merge_into_base(
    adapter: LoRAAdapter,
    base_model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    model_class: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """W = W_base + ΔW for every module, through PEFT's ``merge_and_unload``; saved with ``save_pretrained``.

    A bitsandbytes 4-bit (NF4/FP4) or 8-bit base (``quantization_config`` in its config.json) is dequantized
    first and the merge saved as a float model in the base's dtype, loadable without bitsandbytes (see
    :func:`_load_base` and docs/lora_arithmetic.md, "Quantized bases (QLoRA)").

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
    model, dtype = _load_base(base_dir, model_class)
    modules = dict(model.named_modules())
    for module, d in adapter.deltas.items():
        if adapter.kinds.get(module) == "parameter":
            _check_expert(model, module, d.shape, adapter.config.get("target_parameters") or (), base_dir)
            continue
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
    config, tensors = adapter_files(adapter, dtype=torch.float32)
    config["base_model_name_or_path"] = str(base_dir)
    with tempfile.TemporaryDirectory() as adir:
        save_file(tensors, os.path.join(adir, WEIGHTS_NAME), metadata={"format": "pt"})
        Path(adir, CONFIG_NAME).write_text(json.dumps(config, default=str))
        merged = PeftModel.from_pretrained(model, adir).merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        merged.save_pretrained(str(tmp))
        from robustft.merge.io import copy_side_files

        copy_side_files(None, base_dir, tmp)  # tokenizer files: the same list as merged checkpoints
    return out
