"""WEMoE: a transformers model whose MLP blocks are weight-ensembling mixtures of experts, its router trained
by test-time entropy minimisation.

Upscaling (:func:`upscale_wemoe`, as FusionBench's ``we_moe``, Tang et al., 2024, arXiv:2402.00433): every
linear layer of every MLP block keeps θ_start and the K task vectors τ_k = θ_k − θ_start and computes, per
input, the layer at θ_start + Σ_k r_k(x) τ_k (:func:`robustft.ops.wemoe.ensembled_linear`, exact by
linearity), with r(x) from one router per block on the block's input hidden states (FusionBench's gate: 0,
1 or 2 linear layers with ReLU, the last one's bias at ``init_lambda``). Every other parameter is merged once
by task arithmetic, θ_start + ``scaling_factor``·Σ_k τ_k. The routers are the only trainable parameters;
:func:`fit_wemoe_router` trains them on unlabelled batches by mean prediction entropy (the training loop of
:mod:`robustft.interpolation.learned`, the entropy of :mod:`robustft.ops.dawin`). The model stays the user's
model (same
class, ``generate``, Trainer); :func:`save_wemoe` / :func:`load_wemoe` write and read it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.checks import check_choice, check_number, short_repr
from robustft.core.checkpoint import atomic_output_dir
from robustft.core.model import call_with_weights, is_causal_lm, minimise
from robustft.ops.learned import check_task_vectors
from robustft.ops.merge import task_arithmetic
from robustft.ops.wemoe import ROUTINGS, ensembled_linear, routing_weights

__all__ = [
    "ARCHITECTURES",
    "EnsembledLinear",
    "WEMoEFormatError",
    "WEMoERouter",
    "fit_wemoe",
    "fit_wemoe_router",
    "load_wemoe",
    "save_wemoe",
    "upscale_wemoe",
    "wemoe_options",
]

#: file names in a folder written by :func:`save_wemoe`
WEIGHTS_FILE = "wemoe.safetensors"
META_FILE = "wemoe.json"
FORMAT = "robustft-wemoe"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BlockSpec:
    """Where the MLP of one transformer layer is: relative to the module of class ``block``, the module whose
    input the router reads (``router_on``), the one after whose forward the routing ends (``ends_at``) and
    the linear layers ensembled (``linears``; ``transposed`` for GPT-2's Conv1D, weight (in, out))."""

    router_on: str
    ends_at: str
    linears: tuple[str, ...]
    transposed: bool = False


#: MLP block class -> where its router and linear layers are (Llama, GPT-2, BERT); other models are refused
ARCHITECTURES: dict[str, BlockSpec] = {
    "LlamaMLP": BlockSpec("", "", ("gate_proj", "up_proj", "down_proj")),
    "GPT2MLP": BlockSpec("", "", ("c_fc", "c_proj"), transposed=True),
    # BERT's MLP spans BertIntermediate (dense, activation) and BertOutput (dense; its LayerNorm after the
    # residual is not an MLP weight and is merged by task arithmetic)
    "BertLayer": BlockSpec("intermediate", "output", ("intermediate.dense", "output.dense")),
}


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_module(root, parent), name, module)


class _Context(nn.Module):
    """Attached to the upscaled model as ``wemoe``: the upscaling's options and, during a forward pass, the
    attention mask the routers average over (captured by a pre-hook on the model; no tensors saved)."""

    def __init__(self, options: Mapping[str, Any]):
        super().__init__()
        self.options = dict(options)
        self.mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def release(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.mask = None


class WEMoERouter(nn.Module):
    """r(x) for one MLP block: FusionBench's weight-ensembling gate, 0, 1 or 2 linear layers (ReLU between).

    ``hidden_layers=0``: r is a learned constant vector; 1: r = W h + b; 2: r = W₂ ReLU(W₁ h + b₁) + b₂ with
    W₁ (hidden, hidden). Initialised as FusionBench: weights N(0, 0.01²), first biases 0, the last bias (or
    the constant) ``init_lambda``, so r ≈ init_lambda for every expert at the start (≈ task arithmetic).
    Routing per ``"token"`` or per ``"sequence"`` (mean over the attention mask's positions).
    """

    def __init__(self, hidden_size: int, num_experts: int, hidden_layers: int = 2, init_lambda: float = 0.3,
                 routing: str = "sequence", dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"router_hidden_layers: expected 0, 1 or 2, got {hidden_layers!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
        kw = {"dtype": dtype, "device": device}
        self.hidden_layers, self.routing_mode = hidden_layers, routing
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.full((num_experts,), float(init_lambda), **kw))
        elif hidden_layers == 1:
            self.fc = nn.Linear(hidden_size, num_experts, **kw)
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.constant_(self.fc.bias, float(init_lambda))
        else:
            self.fc1 = nn.Linear(hidden_size, hidden_size, **kw)
            self.fc2 = nn.Linear(hidden_size, num_experts, **kw)
            nn.init.normal_(self.fc1.weight, std=0.01)
            nn.init.zeros_(self.fc1.bias)
            nn.init.normal_(self.fc2.weight, std=0.01)
            nn.init.constant_(self.fc2.bias, float(init_lambda))
        self.routing: torch.Tensor | None = None
        object.__setattr__(self, "context", None)  # the model's _Context, a reference, not a child

    def gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The router's per-token outputs (N, T, K) on hidden states (N, T, H)."""
        if self.hidden_layers == 0:
            return self.weight.expand(*hidden.shape[:-1], self.weight.shape[0])
        if self.hidden_layers == 1:
            return self.fc(hidden)
        return self.fc2(torch.relu(self.fc1(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """r: (N, T, K) per token, (N, 1, K) per sequence."""
        mask = None
        context = self.context
        if self.routing_mode == "sequence" and context is not None and context.mask is not None:
            mask = context.mask
            if tuple(mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(f"attention_mask: shape {tuple(mask.shape)} does not match the MLP's hidden "
                                 f"states {tuple(hidden.shape[:2])}; per-sequence routing needs the whole "
                                 "sequence (for generation with a cache upscale with routing='token')")
        return routing_weights(self.gate(hidden), self.routing_mode, mask)

    def start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the block's input module: route on its input hidden states."""
        hidden = args[0] if args else next(iter(kwargs.values()))
        self.routing = self(hidden)

    def end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Hook after the block's last module: the routing is not kept past the block."""
        self.routing = None


class EnsembledLinear(nn.Module):
    """A linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) at θ_start + Σ_k r_k(x) τ_k, r from its router.

    Holds the start ``weight``/``bias`` (the original module's own parameters, not copied) and the task
    vectors ``weight_vectors`` (K, *weight.shape), ``bias_vectors`` (K, out), all frozen.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, weight_vectors: torch.Tensor,
                 bias_vectors: torch.Tensor | None, router: WEMoERouter, transposed: bool = False):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.weight_vectors = nn.Parameter(weight_vectors, requires_grad=False)
        self.bias_vectors = None if bias_vectors is None else nn.Parameter(bias_vectors, requires_grad=False)
        self.transposed = transposed
        object.__setattr__(self, "router", router)  # a reference: the router is its block's child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router.routing
        if r is None:
            raise RuntimeError("EnsembledLinear: called outside its MLP block's forward (no routing weights)")
        w, wv = self.weight, self.weight_vectors
        if self.transposed:
            w, wv = w.T, wv.transpose(1, 2)
        return ensembled_linear(x, w, self.bias, wv, self.bias_vectors, r)

    def extra_repr(self) -> str:
        return f"experts={self.weight_vectors.shape[0]}, weight={tuple(self.weight.shape)}"


def _blocks(model: nn.Module) -> list[tuple[str, BlockSpec]]:
    """(name, spec) of every MLP block WEMoE knows in the model; ValueError naming the class when none."""
    if isinstance(getattr(model, "wemoe", None), _Context):
        raise ValueError(f"model: {type(model).__name__} is already upscaled to WEMoE")
    found = [(n, ARCHITECTURES[type(m).__name__]) for n, m in model.named_modules()
             if type(m).__name__ in ARCHITECTURES]
    if not found:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"model: {type(model).__name__} has no MLP block WEMoE can upscale (supported "
                         f"blocks: {known}, i.e. Llama, GPT-2 and BERT models)")
    for name, _ in found:
        if getattr(_module(model, name), "chunk_size_feed_forward", 0):
            raise ValueError(f"model: {name} chunks its feed-forward (chunk_size_feed_forward > 0); set it "
                             "to 0 for WEMoE")
    return found


def _linear_params(module: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model: {name} is not a linear layer ({type(module).__name__})")
    return weight, getattr(module, "bias", None)


def wemoe_options(model: nn.Module) -> dict[str, Any]:
    """The options an upscaled model was built with (experts, routing, router, factors, blocks)."""
    context = getattr(model, "wemoe", None)
    if not isinstance(context, _Context):
        raise ValueError(f"model: {type(model).__name__} is not a WEMoE model (upscale_wemoe or load_wemoe)")
    return dict(context.options)


def _install(model: nn.Module, vectors: dict[str, list[torch.Tensor]] | None, options: Mapping[str, Any]
             ) -> None:
    """Put routers and ensembled linear layers into the model's MLP blocks, hooks included; the task vectors
    are taken out of ``vectors`` (per parameter name; each list freed once stacked), or zeros to be loaded."""
    k = options["experts"]
    context = _Context(options)
    for block_name, spec in _blocks(model):
        block = _module(model, block_name)
        first = _linear_params(_module(block, spec.linears[0]), f"{block_name}.{spec.linears[0]}")[0]
        hidden = first.shape[0] if spec.transposed else first.shape[1]
        router = WEMoERouter(hidden, k, options["router_hidden_layers"], options["init_lambda"],
                             options["routing"], dtype=first.dtype, device=first.device)
        object.__setattr__(router, "context", context)
        on, ends = _module(block, spec.router_on), _module(block, spec.ends_at)
        on.wemoe_router = router
        on.register_forward_pre_hook(router.start, with_kwargs=True)
        ends.register_forward_hook(router.end, with_kwargs=True)
        for linear in spec.linears:
            full = f"{block_name}.{linear}" if block_name else linear
            weight, bias = _linear_params(_module(block, linear), full)
            if vectors is None:
                wv = torch.zeros((k, *weight.shape), dtype=weight.dtype, device=weight.device)
                bv = None if bias is None else torch.zeros((k, *bias.shape), dtype=bias.dtype,
                                                           device=bias.device)
            else:
                wv = torch.stack(vectors.pop(f"{full}.weight"))
                bv = None if bias is None else torch.stack(vectors.pop(f"{full}.bias"))
            _set_module(block, linear, EnsembledLinear(weight, bias, wv, bv, router, spec.transposed))
    model.wemoe = context
    model.register_forward_pre_hook(context.capture, with_kwargs=True)
    model.register_forward_hook(context.release, with_kwargs=True)
    for name, p in model.named_parameters():
        p.requires_grad_(".wemoe_router." in f".{name}")


def upscale_wemoe(
    start: nn.Module,
    finetuned: nn.Module | Sequence[nn.Module],
    scaling_factor: float = 0.3,
    init_lambda: float = 0.3,
    router_hidden_layers: int = 2,
    routing: str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """The WEMoE model of ``start`` and K ``finetuned`` models of the same architecture (Llama, GPT-2, BERT).

    MLP linear layers become :class:`EnsembledLinear` (θ_start + Σ_k r_k(x) τ_k) with one
    :class:`WEMoERouter` per block; every other parameter becomes θ_start + ``scaling_factor``·Σ_k τ_k (task
    arithmetic; FusionBench passes its ``init_lambda`` here, 0.3). ``routing``: ``"token"`` or ``"sequence"``;
    None picks ``"token"`` for a causal LM (a sequence mean would let a position see later tokens) and
    ``"sequence"`` otherwise (FusionBench's). Only the routers are trainable afterwards. ``inplace=False``
    upscales a deep copy of ``start``; ``True`` reuses start's tensors (memory: start + K × the MLP weights +
    routers); the fine-tuned models are only read and may be freed afterwards.
    """
    ends = [finetuned] if isinstance(finetuned, nn.Module) else list(finetuned)
    if not ends:
        raise ValueError("finetuned: no fine-tuned model given; WEMoE needs at least one expert (K >= 1)")
    if routing is None:
        routing = "token" if is_causal_lm(start) else "sequence"
    if routing not in ROUTINGS:
        raise ValueError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    if router_hidden_layers not in (0, 1, 2):
        raise ValueError(f"router_hidden_layers: expected 0, 1 or 2, got {router_hidden_layers!r}")
    blocks = _blocks(start)
    start_params = {n: p for n, p in start.named_parameters() if p.is_floating_point()}
    end_params = [{n: p for n, p in e.named_parameters() if n in start_params} for e in ends]
    check_task_vectors(start_params, end_params)
    options = {"experts": len(ends), "routing": routing, "router_hidden_layers": int(router_hidden_layers),
               "init_lambda": float(init_lambda), "scaling_factor": float(scaling_factor),
               "blocks": [n for n, _ in blocks]}
    model = start if inplace else copy.deepcopy(start)
    ensembled = {f"{b}.{lin}" if b else lin for b, spec in blocks for lin in spec.linears}
    mlp_names = {n for n in start_params if n.rpartition(".")[0] in ensembled}
    with torch.no_grad():
        vectors = {n: [e[n].detach().to(start_params[n].dtype) - start_params[n].detach() for e in end_params]
                   for n in mlp_names}
        _install(model, vectors, options)
        live = dict(model.named_parameters())
        for n, s in start_params.items():
            if n in mlp_names:
                continue
            taus = [e[n].detach().to(s.dtype) - s.detach() for e in end_params]
            live[n].copy_(s.detach() + scaling_factor * task_arithmetic(taus))
    return model


def fit_wemoe_router(
    model: nn.Module,
    data: Iterable[Any],
    steps: int = 1000,
    lr: float = 1e-4,
    optimizer: str = "adam",
    causal_lm: bool | None = None,
) -> list[float]:
    """Train the routers of an upscaled model by test-time entropy minimisation; the entropy at each step.

    ``data``: unlabelled batches (mappings for ``model(**batch)``, input tensors, or ``(inputs, ...)``
    tuples), cycled. The objective is the batch's mean prediction entropy (:mod:`robustft.ops.dawin`: per
    input for a classifier; per sequence, the mean next-token entropy, for a causal LM), minimised by Adam
    (FusionBench's, lr 1e-4) or SGD on the router parameters only. The model runs in its current mode.
    """
    wemoe_options(model)
    routers = [p for n, p in model.named_parameters() if ".wemoe_router." in f".{n}"]
    for p in routers:
        p.requires_grad_(True)
    causal = is_causal_lm(model) if causal_lm is None else bool(causal_lm)
    def forward(batch):
        return call_with_weights(model, {}, batch)

    return minimise(routers, forward, data, "entropy", steps, lr, optimizer, None, None, causal)


def fit_wemoe(
    start: nn.Module,
    finetuned: nn.Module | Sequence[nn.Module],
    data: Iterable[Any],
    steps: int = 1000,
    lr: float = 1e-4,
    **options: Any,
) -> nn.Module:
    """Upscale (:func:`upscale_wemoe`, ``options`` passed on) and train the routers by entropy minimisation on
    ``data`` (:func:`fit_wemoe_router`): the WEMoE model in one call. ``start`` is not modified."""
    optimizer = options.pop("optimizer", "adam")
    causal_lm = options.pop("causal_lm", None)
    model = upscale_wemoe(start, finetuned, **options)
    fit_wemoe_router(model, data, steps=steps, lr=lr, optimizer=optimizer, causal_lm=causal_lm)
    return model


def save_wemoe(model: nn.Module, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an upscaled model to ``output_dir`` atomically: ``wemoe.safetensors`` (every tensor of its state
    dict, tied ones once), ``wemoe.json`` (format, model class, dtype, options) and the config's
    ``config.json``."""
    from safetensors.torch import save_model

    options = wemoe_options(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "dtype": str(dtype).removeprefix("torch."), **options}
    config = getattr(model, "config", None)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        save_model(model, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": FORMAT})
        Path(tmp, META_FILE).write_text(json.dumps(meta, indent=2))
        if hasattr(config, "to_json_file"):
            config.to_json_file(str(Path(tmp) / "config.json"))
    return Path(output_dir)


class WEMoEFormatError(ValueError):
    """A folder :func:`load_wemoe` cannot read (corrupted, foreign or edited files); the message names the
    file and what is wrong with it."""


def _check_names(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of module names, got {short_repr(value)}")


def _check_class_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or "." not in value:
        raise ValueError(f"{name} must be a dotted class name, got {short_repr(value)}")


def _check_float_dtype(name: str, value: Any) -> None:
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must name a floating torch dtype, got {short_repr(value)}")


#: the keys :func:`save_wemoe` writes in ``wemoe.json`` besides format and version, with their checks
_META_CHECKS: dict[str, Any] = {
    "model_class": _check_class_name,
    "dtype": _check_float_dtype,
    "experts": lambda n, v: check_number(n, v, low=1, integer=True),
    "routing": lambda n, v: check_choice(n, v, ROUTINGS),
    "router_hidden_layers": lambda n, v: check_choice(n, v, (0, 1, 2)),
    "init_lambda": check_number,
    "scaling_factor": check_number,
    "blocks": _check_names,
}


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """``wemoe.json`` checked key by key (a :class:`WEMoEFormatError` naming the file and the key)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WEMoEFormatError(f"{meta_path}: not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise WEMoEFormatError(f"{meta_path}: not a {FORMAT} version {FORMAT_VERSION} description")
    for key, check in _META_CHECKS.items():
        if key not in meta:
            raise WEMoEFormatError(f"{meta_path}: no {key!r} (save_wemoe writes it)")
        try:
            check(f"{meta_path}: {key}", meta[key])
        except ValueError as err:
            raise WEMoEFormatError(str(err)) from None
    return meta


def _saved_class(meta_path: Path, name: str) -> type:
    """The transformers model class named in ``wemoe.json``, looked up among transformers' public model
    classes (the allow-list): no module the file names is imported."""
    import transformers

    module_name, _, class_name = name.rpartition(".")
    cls = getattr(transformers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__ == module_name):
        raise WEMoEFormatError(
            f"{meta_path}: model_class {short_repr(name)} is not a transformers model class"
        )
    return cls


def load_wemoe(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The upscaled model saved by :func:`save_wemoe`.

    A transformers model is rebuilt from the folder's ``config.json`` and the class named in ``wemoe.json``
    (looked up among transformers' public model classes; no module named by the file is imported); for
    another class (a wrapper around a transformers encoder) pass ``model``: a not-upscaled model of the
    same architecture (e.g. the start model), which is upscaled in place and gets the saved tensors.
    Corrupted or foreign files raise :class:`WEMoEFormatError` (a ValueError) naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(path)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (save_wemoe writes it)")
    meta = _read_meta(meta_path)
    module_name, _, class_name = meta["model_class"].rpartition(".")
    if model is None:
        if not module_name.startswith("transformers."):
            raise WEMoEFormatError(f"{meta_path}: model class {meta['model_class']} is not a transformers "
                                   "model; pass model= (a not-upscaled model of that class) to load_wemoe")
        from transformers import AutoConfig

        cls = _saved_class(meta_path, meta["model_class"])
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as err:
            raise WEMoEFormatError(f"{folder / 'config.json'}: not a transformers config ({err})") from None
        if not isinstance(config, cls.config_class):
            raise WEMoEFormatError(f"{folder / 'config.json'}: a {type(config).__name__}, not the "
                                   f"{cls.config_class.__name__} of {meta['model_class']} ({meta_path})")
        model = cls(config).to(getattr(torch, meta["dtype"]))
    elif type(model).__qualname__ != class_name:
        raise ValueError(f"model: {type(model).__name__}, but {meta_path} was saved from "
                         f"{meta['model_class']}")
    options = {k: meta[k] for k in ("experts", "routing", "router_hidden_layers", "init_lambda",
                                    "scaling_factor", "blocks")}
    found = [n for n, _ in _blocks(model)]
    if found != options["blocks"]:
        raise ValueError(f"model: MLP blocks {found[:3]}... differ from the saved {options['blocks'][:3]}...")
    _install(model, None, options)
    try:
        missing, unexpected = load_model(model, str(weights_path), strict=False)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise WEMoEFormatError(f"{weights_path}: cannot be read into the model ({err})") from None
    if missing or unexpected:
        raise WEMoEFormatError(f"{weights_path}: does not fit the model: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
    return model
